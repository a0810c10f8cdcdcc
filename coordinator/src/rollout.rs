//! Fleet-wide roll-outs as a pure state machine: one version over many pools, a limited
//! number of pools in flight, never a pool together with its paired backup pool, an optional
//! canary pool first, and the whole roll-out stopping when a pool needs a person.
//!
//! Like the upgrade engine, [`Rollout::step`] takes an event and returns the actions that
//! follow, with no I/O and no clock (times come in the events). `rollout_driver` stores each
//! new state (fenced) before it carries the actions out. Each pool is upgraded by its own
//! ordinary plan, so every pool-level guarantee (readiness gate, fencing, resume) holds
//! unchanged; this layer only decides when each pool's plan starts and what happens to the
//! others when one stops.
//!
//! Pools are started as slots free up rather than in fixed waves: a wave never waits for its
//! slowest pool, and `max_in_flight` bounds the blast radius exactly as a wave size would.

use crate::control::StartRequest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most pools one roll-out may name.
pub const MAX_POOLS: usize = 1000;

/// What a roll-out does, fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// `rollout-<unix ms>`: unique, and sorts by start time.
    pub id: String,
    /// The pools, in the order they are started (the canary first, when there is one).
    pub pools: Vec<String>,
    /// Each pool's configured paired backup pool, when it has one.
    #[serde(default)]
    pub paired: BTreeMap<String, String>,
    /// Started alone, and must complete before any other pool starts.
    #[serde(default)]
    pub canary: Option<String>,
    /// Pools upgrading at once, >= 1.
    pub max_in_flight: u32,
    /// What every pool's plan is made from (its `pool` is set per pool).
    pub template: StartRequest,
    /// Who started it (the caller's role).
    pub started_by: String,
    /// When (unix ms).
    pub started_ms: u64,
}

impl RolloutPlan {
    /// The plan id a pool's upgrade gets in this roll-out: fixed in advance, so a new leader
    /// can tell whether the start it finds stored was this roll-out's.
    pub fn plan_id(&self, pool: &str) -> String {
        let stamp = self.id.strip_prefix("rollout-").unwrap_or(&self.id);
        format!("{pool}-{stamp}")
    }

    /// True when `a` and `b` are paired (either way round): never upgraded together.
    pub fn paired_with(&self, a: &str, b: &str) -> bool {
        self.paired.get(a).is_some_and(|p| p == b) || self.paired.get(b).is_some_and(|p| p == a)
    }
}

/// Where the roll-out stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Pools are being started as slots free up.
    Running,
    /// No new pool starts, and the pools in flight are paused: by an operator, or because a
    /// pool failed or paused (the reason says which). `resume` goes on; a failed pool stays
    /// failed.
    Paused { reason: String },
    /// Every pool completed.
    Completed,
    /// Every pool ended, and some did not complete (after a resume past a failure).
    Failed { reason: String },
    /// Stopped by an operator: pools not started are skipped, pools in flight aborted.
    Aborted { reason: String },
}

impl RolloutStatus {
    /// Completed, Failed or Aborted: nothing new will start.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RolloutStatus::Completed | RolloutStatus::Failed { .. } | RolloutStatus::Aborted { .. }
        )
    }

    /// Its name, as the CLI and the API show it.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutStatus::Running => "running",
            RolloutStatus::Paused { .. } => "paused",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Failed { .. } => "failed",
            RolloutStatus::Aborted { .. } => "aborted",
        }
    }

    /// Why it is paused, failed or aborted; empty otherwise.
    pub fn reason(&self) -> &str {
        match self {
            RolloutStatus::Paused { reason }
            | RolloutStatus::Failed { reason }
            | RolloutStatus::Aborted { reason } => reason,
            _ => "",
        }
    }
}

/// One pool's place in the roll-out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Not started yet.
    Pending,
    /// Its start was decided and stored; the plan may or may not be stored yet.
    Starting,
    /// Its upgrade (plan [`RolloutPlan::plan_id`]) runs.
    Running,
    /// Its upgrade completed.
    Completed,
    /// Its upgrade ended otherwise (failed, aborted, rolled back), or could not start.
    Failed { reason: String },
    /// Never started: the roll-out was aborted first.
    Skipped { reason: String },
}

impl Stage {
    /// Starting or Running: counts toward `max_in_flight`.
    pub fn in_flight(&self) -> bool {
        matches!(self, Stage::Starting | Stage::Running)
    }

    /// Completed, Failed or Skipped.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Stage::Completed | Stage::Failed { .. } | Stage::Skipped { .. }
        )
    }

    /// Its name, as the CLI and the API show it.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Starting => "starting",
            Stage::Running => "running",
            Stage::Completed => "completed",
            Stage::Failed { .. } => "failed",
            Stage::Skipped { .. } => "skipped",
        }
    }
}

/// One pool of the roll-out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRun {
    #[serde(flatten)]
    pub stage: Stage,
    /// Why a pending pool was not started yet (its paired pool upgrading outside this
    /// roll-out, an upgrade already running on it); cleared when it is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
}

/// What happens to a roll-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutEvent {
    /// The pool's plan is stored and runs.
    Started {
        pool: String,
        at_ms: u64,
    },
    /// The pool's plan could not be started; with `retry`, it is tried again later (the
    /// reason is shown meanwhile), otherwise the pool fails.
    StartRefused {
        pool: String,
        reason: String,
        retry: bool,
        at_ms: u64,
    },
    /// The pool's upgrade paused (a failure, its own policy, or a person).
    PoolPaused {
        pool: String,
        reason: String,
    },
    /// The pool's upgrade ended: completed, or otherwise with a reason.
    PoolEnded {
        pool: String,
        completed: bool,
        reason: String,
        at_ms: u64,
    },
    /// Try the waiting pools again.
    Retry,
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    Abort {
        by: String,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutAction {
    /// Start the pool's upgrade, with plan id `plan_id`.
    Start { pool: String, plan_id: String },
    /// Pause the pool's upgrade.
    Pause { pool: String },
    /// Resume it.
    Resume { pool: String },
    /// Abort it.
    Abort { pool: String },
}

/// A roll-out and where each pool stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub plan: RolloutPlan,
    pub status: RolloutStatus,
    pub pools: BTreeMap<String, PoolRun>,
}

impl Rollout {
    /// A new roll-out, and its first starts.
    pub fn new(plan: RolloutPlan) -> (Rollout, Vec<RolloutAction>) {
        let pools = plan
            .pools
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    PoolRun {
                        stage: Stage::Pending,
                        waiting: None,
                        started_ms: None,
                        ended_ms: None,
                    },
                )
            })
            .collect();
        let mut r = Rollout {
            plan,
            status: RolloutStatus::Running,
            pools,
        };
        let mut out = Vec::new();
        r.dispatch(&mut out);
        (r, out)
    }

    /// True once nothing more will happen: a final status and no pool in flight.
    pub fn is_ended(&self) -> bool {
        self.status.is_terminal() && !self.pools.values().any(|p| p.stage.in_flight())
    }

    /// Pools starting or running.
    pub fn in_flight(&self) -> impl Iterator<Item = &String> {
        self.pools
            .iter()
            .filter(|(_, p)| p.stage.in_flight())
            .map(|(n, _)| n)
    }

    /// True when a pending pool waits to be tried again.
    pub fn has_waiting(&self) -> bool {
        self.status == RolloutStatus::Running
            && self
                .pools
                .values()
                .any(|p| p.stage == Stage::Pending && p.waiting.is_some())
    }

    /// Applies `event`; returns what to do.
    pub fn step(&mut self, event: RolloutEvent) -> Vec<RolloutAction> {
        let mut out = Vec::new();
        match event {
            RolloutEvent::Started { pool, at_ms } => {
                if let Some(p) = self.pools.get_mut(&pool) {
                    if p.stage == Stage::Starting {
                        p.stage = Stage::Running;
                        p.started_ms = Some(at_ms);
                        // Decided before a pause or abort that came in meanwhile: follow it.
                        match self.status {
                            RolloutStatus::Paused { .. } => out.push(RolloutAction::Pause { pool }),
                            RolloutStatus::Aborted { .. } => {
                                out.push(RolloutAction::Abort { pool })
                            }
                            _ => {}
                        }
                    }
                }
            }
            RolloutEvent::StartRefused {
                pool,
                reason,
                retry,
                at_ms,
            } => {
                if let Some(p) = self.pools.get_mut(&pool) {
                    if p.stage == Stage::Starting {
                        if retry && !self.status.is_terminal() {
                            p.stage = Stage::Pending;
                            p.waiting = Some(reason);
                        } else {
                            let why = format!("pool {pool} could not start: {reason}");
                            p.stage = Stage::Failed { reason };
                            p.ended_ms = Some(at_ms);
                            self.stop(why, &mut out);
                        }
                    }
                }
            }
            RolloutEvent::PoolPaused { pool, reason } => {
                let running = self
                    .pools
                    .get(&pool)
                    .is_some_and(|p| p.stage == Stage::Running);
                if running {
                    self.stop(format!("pool {pool} paused: {reason}"), &mut out);
                    out.retain(|a| *a != RolloutAction::Pause { pool: pool.clone() });
                }
            }
            RolloutEvent::PoolEnded {
                pool,
                completed,
                reason,
                at_ms,
            } => {
                if let Some(p) = self.pools.get_mut(&pool) {
                    if p.stage.in_flight() {
                        p.ended_ms = Some(at_ms);
                        if completed {
                            p.stage = Stage::Completed;
                        } else {
                            let why = format!("pool {pool} did not complete: {reason}");
                            p.stage = Stage::Failed { reason };
                            self.stop(why, &mut out);
                        }
                    }
                }
            }
            RolloutEvent::Retry => {
                for p in self.pools.values_mut() {
                    p.waiting = None;
                }
            }
            RolloutEvent::Pause { by } => {
                if self.status == RolloutStatus::Running {
                    self.stop(format!("paused by {by}"), &mut out);
                }
            }
            RolloutEvent::Resume { by } => {
                if let RolloutStatus::Paused { .. } = self.status {
                    tracing::debug!(rollout = %self.plan.id, %by, "roll-out resumed");
                    self.status = RolloutStatus::Running;
                    for (name, p) in &mut self.pools {
                        p.waiting = None;
                        if p.stage == Stage::Running {
                            out.push(RolloutAction::Resume { pool: name.clone() });
                        }
                    }
                }
            }
            RolloutEvent::Abort { by } => {
                if !self.status.is_terminal() {
                    self.status = RolloutStatus::Aborted {
                        reason: format!("aborted by {by}"),
                    };
                    for (name, p) in &mut self.pools {
                        match p.stage {
                            Stage::Pending => {
                                p.stage = Stage::Skipped {
                                    reason: format!("the roll-out was aborted by {by}"),
                                };
                                p.waiting = None;
                            }
                            Stage::Running => out.push(RolloutAction::Abort { pool: name.clone() }),
                            _ => {}
                        }
                    }
                }
            }
        }
        self.dispatch(&mut out);
        self.settle();
        out
    }

    /// A pool needs a person: start nothing new and pause the pools in flight.
    fn stop(&mut self, reason: String, out: &mut Vec<RolloutAction>) {
        if self.status != RolloutStatus::Running {
            return;
        }
        self.status = RolloutStatus::Paused { reason };
        for (name, p) in &self.pools {
            if p.stage == Stage::Running {
                out.push(RolloutAction::Pause { pool: name.clone() });
            }
        }
    }

    /// Starts pending pools while slots are free: the canary alone and first; never a pool
    /// while its paired pool is in flight.
    fn dispatch(&mut self, out: &mut Vec<RolloutAction>) {
        if self.status != RolloutStatus::Running {
            return;
        }
        if let Some(canary) = self.plan.canary.clone() {
            match self
                .pools
                .get(&canary)
                .map(|p| (&p.stage, p.waiting.is_some()))
            {
                Some((Stage::Completed, _)) | None => {}
                Some((Stage::Pending, waiting)) => {
                    // A refused start waits for its retry, and nothing else starts meanwhile.
                    if !waiting {
                        self.launch(&canary, out);
                    }
                    return;
                }
                // In flight, or failed (which stopped the roll-out; a resume past it leaves
                // the other pools waiting for nothing, so they go on).
                Some((Stage::Failed { .. }, _)) | Some((Stage::Skipped { .. }, _)) => {}
                Some(_) => return,
            }
        }
        let max = self.plan.max_in_flight.max(1) as usize;
        let mut flying: Vec<String> = self.in_flight().cloned().collect();
        for name in self.plan.pools.clone() {
            if flying.len() >= max {
                break;
            }
            let ready = self
                .pools
                .get(&name)
                .is_some_and(|p| p.stage == Stage::Pending && p.waiting.is_none());
            if !ready || flying.iter().any(|f| self.plan.paired_with(f, &name)) {
                continue;
            }
            self.launch(&name, out);
            flying.push(name);
        }
    }

    fn launch(&mut self, pool: &str, out: &mut Vec<RolloutAction>) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.stage = Stage::Starting;
            p.waiting = None;
            out.push(RolloutAction::Start {
                pool: pool.to_owned(),
                plan_id: self.plan.plan_id(pool),
            });
        }
    }

    /// Ends the roll-out when every pool has ended.
    fn settle(&mut self) {
        if self.status.is_terminal() || !self.pools.values().all(|p| p.stage.is_final()) {
            return;
        }
        let missed: Vec<String> = self
            .plan
            .pools
            .iter()
            .filter(|n| {
                self.pools
                    .get(*n)
                    .is_some_and(|p| p.stage != Stage::Completed)
            })
            .cloned()
            .collect();
        self.status = if missed.is_empty() {
            RolloutStatus::Completed
        } else {
            RolloutStatus::Failed {
                reason: format!(
                    "{} of {} pools not upgraded: {}",
                    missed.len(),
                    self.plan.pools.len(),
                    missed.join(", ")
                ),
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(pools: &[&str], pairs: &[(&str, &str)], canary: Option<&str>, max: u32) -> RolloutPlan {
        let mut paired = BTreeMap::new();
        for (a, b) in pairs {
            paired.insert((*a).to_owned(), (*b).to_owned());
            paired.insert((*b).to_owned(), (*a).to_owned());
        }
        RolloutPlan {
            id: "rollout-1700000000000".into(),
            pools: pools.iter().map(|p| (*p).to_owned()).collect(),
            paired,
            canary: canary.map(str::to_owned),
            max_in_flight: max,
            template: StartRequest::default(),
            started_by: "operator/t".into(),
            started_ms: 1,
        }
    }

    fn started(out: &[RolloutAction]) -> Vec<String> {
        out.iter()
            .filter_map(|a| match a {
                RolloutAction::Start { pool, .. } => Some(pool.clone()),
                _ => None,
            })
            .collect()
    }

    fn ok(r: &mut Rollout, pool: &str) -> Vec<RolloutAction> {
        r.step(RolloutEvent::Started {
            pool: pool.into(),
            at_ms: 2,
        })
    }

    fn done(r: &mut Rollout, pool: &str, completed: bool) -> Vec<RolloutAction> {
        r.step(RolloutEvent::PoolEnded {
            pool: pool.into(),
            completed,
            reason: if completed {
                ""
            } else {
                "failed: fe-1 install"
            }
            .into(),
            at_ms: 3,
        })
    }

    #[test]
    fn the_canary_goes_alone_then_the_rest_fill_the_slots() {
        let (mut r, out) = Rollout::new(plan(&["c", "a", "b", "d"], &[], Some("c"), 2));
        assert_eq!(started(&out), ["c"]);
        assert!(ok(&mut r, "c").is_empty());
        let out = done(&mut r, "c", true);
        assert_eq!(started(&out), ["a", "b"]);
        assert_eq!(
            out[0],
            RolloutAction::Start {
                pool: "a".into(),
                plan_id: "a-1700000000000".into()
            }
        );
        ok(&mut r, "a");
        ok(&mut r, "b");
        assert_eq!(started(&done(&mut r, "b", true)), ["d"]);
        ok(&mut r, "d");
        done(&mut r, "a", true);
        assert_eq!(r.status, RolloutStatus::Running);
        done(&mut r, "d", true);
        assert_eq!(r.status, RolloutStatus::Completed);
        assert!(r.is_ended());
    }

    #[test]
    fn paired_pools_never_run_together_even_with_free_slots() {
        let (mut r, out) = Rollout::new(plan(&["a", "a-dr", "b"], &[("a", "a-dr")], None, 3));
        assert_eq!(started(&out), ["a", "b"], "a-dr waits for a");
        ok(&mut r, "a");
        ok(&mut r, "b");
        assert!(started(&done(&mut r, "b", true)).is_empty());
        assert_eq!(started(&done(&mut r, "a", true)), ["a-dr"]);
    }

    #[test]
    fn a_failed_pool_stops_the_rollout_and_pauses_the_others() {
        let (mut r, _) = Rollout::new(plan(&["a", "b", "c"], &[], None, 2));
        ok(&mut r, "a");
        ok(&mut r, "b");
        let out = done(&mut r, "a", false);
        assert_eq!(out, [RolloutAction::Pause { pool: "b".into() }]);
        assert!(
            matches!(&r.status, RolloutStatus::Paused { reason } if reason.contains("pool a did not complete"))
        );
        // b completing while stopped starts nothing.
        assert!(done(&mut r, "b", true).is_empty());
        assert_eq!(r.pools["c"].stage, Stage::Pending);
        // A resume goes on past the failure; the roll-out ends failed, naming the pool.
        let out = r.step(RolloutEvent::Resume { by: "op".into() });
        assert_eq!(started(&out), ["c"]);
        ok(&mut r, "c");
        done(&mut r, "c", true);
        assert!(
            matches!(&r.status, RolloutStatus::Failed { reason } if reason == "1 of 3 pools not upgraded: a")
        );
    }

    #[test]
    fn a_paused_pool_stops_the_rollout_and_resume_resumes_it() {
        let (mut r, _) = Rollout::new(plan(&["a", "b", "c"], &[], None, 2));
        ok(&mut r, "a");
        ok(&mut r, "b");
        let out = r.step(RolloutEvent::PoolPaused {
            pool: "b".into(),
            reason: "fe-3 failed".into(),
        });
        assert_eq!(out, [RolloutAction::Pause { pool: "a".into() }]);
        let out = r.step(RolloutEvent::Resume { by: "op".into() });
        assert_eq!(
            out,
            [
                RolloutAction::Resume { pool: "a".into() },
                RolloutAction::Resume { pool: "b".into() }
            ]
        );
    }

    #[test]
    fn abort_skips_what_has_not_started_and_aborts_what_runs() {
        let (mut r, _) = Rollout::new(plan(&["a", "b", "c"], &[], None, 1));
        let out = r.step(RolloutEvent::Abort { by: "op".into() });
        assert!(out.is_empty(), "a is still starting: {out:?}");
        assert!(!r.is_ended());
        // The start decided before the abort lands: abort it.
        assert_eq!(ok(&mut r, "a"), [RolloutAction::Abort { pool: "a".into() }]);
        done(&mut r, "a", false);
        assert!(r.is_ended());
        assert!(matches!(r.status, RolloutStatus::Aborted { .. }));
        assert!(matches!(r.pools["b"].stage, Stage::Skipped { .. }));
    }

    #[test]
    fn a_refused_start_waits_for_a_retry_or_fails_the_pool() {
        let (mut r, _) = Rollout::new(plan(&["a", "b"], &[], None, 1));
        let out = r.step(RolloutEvent::StartRefused {
            pool: "a".into(),
            reason: "paired pool a-dr is upgrading".into(),
            retry: true,
            at_ms: 2,
        });
        assert_eq!(started(&out), ["b"], "the next pool takes the slot");
        assert!(r.has_waiting());
        ok(&mut r, "b");
        done(&mut r, "b", true);
        assert!(r.pools["a"].waiting.is_some());
        assert_eq!(started(&r.step(RolloutEvent::Retry)), ["a"]);
        let out = r.step(RolloutEvent::StartRefused {
            pool: "a".into(),
            reason: "version: the target version is required".into(),
            retry: false,
            at_ms: 3,
        });
        assert!(out.is_empty());
        assert!(
            matches!(r.status, RolloutStatus::Failed { .. }),
            "{:?}",
            r.status
        );
    }

    #[test]
    fn the_stored_form_reads_back() {
        let (mut r, _) = Rollout::new(plan(&["a", "b"], &[("a", "b")], Some("a"), 1));
        ok(&mut r, "a");
        let text = serde_json::to_string(&r).unwrap_or_default();
        let back: Rollout = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(back, r);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Start(usize),
        Refuse(usize, bool),
        End(usize, bool),
        Paused(usize),
        Retry,
        Pause,
        Resume,
        Abort,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6usize).prop_map(Op::Start),
            1 => (0..6usize, any::<bool>()).prop_map(|(i, r)| Op::Refuse(i, r)),
            4 => (0..6usize, prop::bool::weighted(0.85)).prop_map(|(i, c)| Op::End(i, c)),
            1 => (0..6usize).prop_map(Op::Paused),
            1 => Just(Op::Retry),
            1 => Just(Op::Pause),
            1 => Just(Op::Resume),
            1 => Just(Op::Abort),
        ]
    }

    proptest! {
        /// Whatever happens: never more pools in flight than allowed, never a pool with its
        /// pair, never another pool while the canary has not completed, never a start while
        /// stopped, never a pool started twice, and an ended roll-out starts nothing.
        #[test]
        fn the_rules_hold_under_any_schedule(ops in prop::collection::vec(op(), 1..80), max in 1u32..4, canary in any::<bool>()) {
            let names = ["a", "a-dr", "b", "b-dr", "c", "d"];
            let p = plan(&names, &[("a", "a-dr"), ("b", "b-dr")], canary.then_some("a"), max);
            let (mut r, first) = Rollout::new(p);
            let check = |r: &Rollout, out: &[RolloutAction], before: &RolloutStatus, stages: &BTreeMap<String, Stage>| -> Result<(), TestCaseError> {
                for pool in started(out) {
                    // A start goes out only while the roll-out runs (a resume may start some).
                    prop_assert_eq!(&r.status, &RolloutStatus::Running, "started {} while {:?} (was {:?})", pool, r.status, before);
                    // Only a pending pool starts: never one started, running or ended before.
                    prop_assert_eq!(&stages[&pool], &Stage::Pending, "{} started again", pool);
                }
                let flying: Vec<&String> = r.in_flight().collect();
                prop_assert!(flying.len() <= max as usize, "{:?} in flight, max {}", flying, max);
                for x in &flying {
                    for y in &flying {
                        prop_assert!(!r.plan.paired_with(x, y), "{} and {} together", x, y);
                    }
                }
                if canary && r.pools["a"].stage != Stage::Completed && !matches!(r.pools["a"].stage, Stage::Failed { .. }) {
                    prop_assert!(flying.iter().all(|f| *f == "a"), "{:?} while the canary is {:?}", flying, r.pools["a"].stage);
                }
                Ok(())
            };
            let pending: BTreeMap<String, Stage> = names.iter().map(|n| ((*n).to_owned(), Stage::Pending)).collect();
            check(&r, &first, &RolloutStatus::Running, &pending)?;
            for o in ops {
                let before = r.status.clone();
                let stages: BTreeMap<String, Stage> = r.pools.iter().map(|(n, p)| (n.clone(), p.stage.clone())).collect();
                let ended = r.is_ended();
                let ev = match o {
                    Op::Start(i) => RolloutEvent::Started { pool: names[i].into(), at_ms: 5 },
                    Op::Refuse(i, retry) => RolloutEvent::StartRefused { pool: names[i].into(), reason: "x".into(), retry, at_ms: 5 },
                    Op::End(i, c) => RolloutEvent::PoolEnded { pool: names[i].into(), completed: c, reason: "x".into(), at_ms: 5 },
                    Op::Paused(i) => RolloutEvent::PoolPaused { pool: names[i].into(), reason: "x".into() },
                    Op::Retry => RolloutEvent::Retry,
                    Op::Pause => RolloutEvent::Pause { by: "op".into() },
                    Op::Resume => RolloutEvent::Resume { by: "op".into() },
                    Op::Abort => RolloutEvent::Abort { by: "op".into() },
                };
                let out = r.step(ev);
                if ended {
                    prop_assert!(out.is_empty(), "an ended roll-out acted: {:?}", out);
                    prop_assert!(r.is_ended());
                }
                check(&r, &out, &before, &stages)?;
            }
            if r.status == RolloutStatus::Completed {
                prop_assert!(r.pools.values().all(|p| p.stage == Stage::Completed));
            }
        }
    }
}
