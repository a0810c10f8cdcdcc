//! The loop around a roll-out ([`crate::rollout`]): store each new state (a fenced write),
//! then act: start, pause, resume or abort pools' upgrades through the control layer, exactly
//! as an operator would, then follow those upgrades and feed what they do back as events.
//!
//! A pool's start is made safe to repeat by its plan id, fixed in advance
//! ([`crate::rollout::RolloutPlan::plan_id`]): a new leader that finds a pool "starting"
//! looks for that plan before starting anything, so a pool is never started twice.

use crate::control::{Control, ControlError, UpgradeCommand};
use crate::engine::{Status, Upgrade};
use crate::progress;
use crate::rollout::{Rollout, RolloutAction, RolloutEvent, RolloutStatus, Stage};
use crate::store::{Leadership, StoreError};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How often waiting pools (a paired pool busy outside the roll-out) are tried again.
const RETRY_WAITING: Duration = Duration::from_secs(1);

/// How often pools are looked at even when nothing signalled a change (a pool whose upgrade
/// has no live driver here).
const POLL: Duration = Duration::from_secs(1);

/// An operator's command to the roll-out, answered once the resulting state is stored.
#[derive(Debug)]
pub struct RolloutCommand {
    pub event: RolloutEvent,
    pub reply: oneshot::Sender<Result<Rollout, ControlError>>,
}

/// Runs one roll-out while this node leads.
#[derive(Debug)]
pub struct RolloutDriver {
    control: Control,
    lead: Leadership,
    rollout: Rollout,
    stored: Option<Rollout>,
    status: watch::Sender<Rollout>,
    /// Pools the roll-out read back from the store had decided to start: a former leader may
    /// have started them (and they may even have ended), so their start looks for the plan
    /// first. A start this leader decides needs no such look: its plan cannot be out yet.
    inherited: std::collections::BTreeSet<String>,
}

/// The pools `r` decided to start and has not seen started.
fn starting(r: &Rollout) -> impl Iterator<Item = &String> {
    r.pools
        .iter()
        .filter(|(_, p)| p.stage == Stage::Starting)
        .map(|(pool, _)| pool)
}

impl RolloutDriver {
    /// A driver for `rollout`; `stored` when it was read from the store as it is.
    pub fn new(
        control: Control,
        lead: Leadership,
        rollout: Rollout,
        stored: bool,
        status: watch::Sender<Rollout>,
    ) -> Self {
        let inherited = if stored {
            starting(&rollout).cloned().collect()
        } else {
            Default::default()
        };
        RolloutDriver {
            control,
            lead,
            stored: stored.then(|| rollout.clone()),
            rollout,
            status,
            inherited,
        }
    }

    /// The actions a roll-out read back from the store needs again: the starts that were
    /// decided (each finds its plan if it went out before), and, in a paused or aborted
    /// roll-out, the pause or abort of its running pools (a former leader may have died
    /// before it reached them all; a pool already paused or aborted is left alone).
    pub fn resumed_actions(r: &Rollout) -> Vec<RolloutAction> {
        let running = r
            .pools
            .iter()
            .filter(|(_, p)| p.stage == Stage::Running)
            .map(|(pool, _)| pool.clone());
        let follow: Vec<RolloutAction> = match r.status {
            RolloutStatus::Paused { .. } => {
                running.map(|pool| RolloutAction::Pause { pool }).collect()
            }
            RolloutStatus::Aborted { .. } => {
                running.map(|pool| RolloutAction::Abort { pool }).collect()
            }
            _ => Vec::new(),
        };
        starting(r)
            .map(|pool| RolloutAction::Start {
                pool: pool.clone(),
                plan_id: r.plan.plan_id(pool),
            })
            .chain(follow)
            .collect()
    }

    /// Stores the roll-out, answers `started`, then drives it until it ends or leadership is
    /// lost.
    pub async fn run(
        mut self,
        first: Vec<RolloutAction>,
        mut commands: mpsc::Receiver<RolloutCommand>,
        started: Option<oneshot::Sender<Result<Rollout, ControlError>>>,
    ) -> Result<Rollout, ControlError> {
        let stored = self.store().await;
        if let Some(tx) = started {
            let _ = tx.send(stored.clone().map(|()| self.rollout.clone()));
        }
        stored?;
        self.status.send_replace(self.rollout.clone());
        let mut queue: VecDeque<RolloutAction> = first.into();
        let mut live: std::collections::BTreeMap<String, watch::Receiver<Option<Upgrade>>> =
            std::collections::BTreeMap::new();
        // The one pool whose status signalled a change; `None`: look at every pool in flight.
        let mut look_at: Option<String> = None;
        loop {
            while let Some(a) = queue.pop_front() {
                // Starts decided together go out together: each waits for its plan's first
                // store write, and a hundred pools should not wait for each other's.
                if let RolloutAction::Start { .. } = a {
                    let mut starts = vec![a];
                    while let Some(RolloutAction::Start { .. }) = queue.front() {
                        starts.extend(queue.pop_front());
                    }
                    let me = &self;
                    let answers =
                        futures_util::future::join_all(starts.into_iter().map(|s| async move {
                            match s {
                                RolloutAction::Start { pool, plan_id } => {
                                    me.start(pool, plan_id).await
                                }
                                _ => Ok(None),
                            }
                        }))
                        .await;
                    let mut events = Vec::new();
                    for ev in answers {
                        events.extend(ev?);
                    }
                    self.apply_all(events, &mut queue).await?;
                    continue;
                }
                if let Some(ev) = self.act(a).await? {
                    self.apply(ev, &mut queue).await?;
                }
            }
            // Follow the pools in flight through their live drivers' status, each receiver
            // kept from one pass to the next so that no change is missed: after a change only
            // the pool that changed is looked at (a step of one server must not cost a look at
            // every pool in flight); all of them after an action, a command or a poll tick.
            let running: Vec<String> = self
                .rollout
                .pools
                .iter()
                .filter(|(_, p)| p.stage == Stage::Running)
                .map(|(n, _)| n.clone())
                .collect();
            live.retain(|pool, _| running.contains(pool));
            for pool in &running {
                if !live.contains_key(pool) {
                    if let Some(h) = self.control.node().driver(pool) {
                        live.insert(pool.clone(), h.status);
                    }
                }
            }
            // A driver that ended no longer signals: its pool is polled from the store.
            live.retain(|_, rx| rx.has_changed().is_ok());
            let full = look_at.is_none();
            let look: Vec<String> = match look_at.take() {
                Some(pool) => vec![pool],
                None => running,
            };
            // An aborted roll-out ends only when its running pools end: an abort that did not
            // reach a pool (its command failed) is sent again at every full look, until the
            // pool's upgrade says it is aborted.
            if full && matches!(self.rollout.status, RolloutStatus::Aborted { .. }) {
                for pool in &look {
                    let pool = pool.clone();
                    self.act(RolloutAction::Abort { pool }).await?;
                }
            }
            let mut events = Vec::new();
            for pool in look {
                if let Some(ev) = self.observe(&pool, live.get_mut(&pool)).await? {
                    events.push(ev);
                }
            }
            if !events.is_empty() {
                self.apply_all(events, &mut queue).await?;
                continue;
            }
            if self.rollout.is_ended() {
                tracing::info!(rollout = %self.rollout.plan.id, status = %self.rollout.status.name(), "roll-out ended");
                return Ok(self.rollout);
            }
            let changed = async {
                if live.is_empty() {
                    std::future::pending::<Option<String>>().await
                } else {
                    let waits = live.iter_mut().map(|(pool, rx)| {
                        Box::pin(async move { rx.changed().await.ok().map(|()| pool.clone()) })
                    });
                    futures_util::future::select_all(waits).await.0
                }
            };
            let retry = self.rollout.has_waiting();
            let lost = self.lead.lost.clone();
            tokio::select! {
                biased;
                _ = lost.cancelled() => {
                    return Err(ControlError::LeadershipLost("leadership lost while driving the roll-out".into()));
                }
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        let r = self.apply(cmd.event, &mut queue).await;
                        let answer = r.clone().map(|()| self.rollout.clone());
                        let _ = cmd.reply.send(answer);
                        r?;
                    }
                    // The node dropped its handle: leadership is being given up.
                    None => return Err(ControlError::LeadershipLost("the roll-out's handle was dropped".into())),
                },
                pool = changed => look_at = pool,
                _ = tokio::time::sleep(RETRY_WAITING), if retry => {
                    self.apply(RolloutEvent::Retry, &mut queue).await?;
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Steps the roll-out, stores the new state, and queues its actions.
    async fn apply(
        &mut self,
        ev: RolloutEvent,
        queue: &mut VecDeque<RolloutAction>,
    ) -> Result<(), ControlError> {
        self.apply_all(vec![ev], queue).await
    }

    /// Steps the roll-out through `events`, stores the state once (nothing acts in between),
    /// and queues their actions.
    async fn apply_all(
        &mut self,
        events: Vec<RolloutEvent>,
        queue: &mut VecDeque<RolloutAction>,
    ) -> Result<(), ControlError> {
        let mut actions = Vec::new();
        for ev in events {
            actions.extend(self.rollout.step(ev));
        }
        self.store().await?;
        self.status.send_replace(self.rollout.clone());
        queue.extend(actions);
        Ok(())
    }

    /// Writes the roll-out when it changed, retrying while the store is unavailable.
    async fn store(&mut self) -> Result<(), ControlError> {
        if self.stored.as_ref() == Some(&self.rollout) {
            return Ok(());
        }
        let mut pause = Duration::from_millis(100);
        loop {
            let op = progress::rollout_write(&self.rollout);
            match self
                .control
                .node()
                .env
                .store
                .fenced_write(&self.lead, vec![op])
                .await
            {
                Ok(_) => {
                    self.stored = Some(self.rollout.clone());
                    return Ok(());
                }
                Err(StoreError::Fenced { epoch }) => {
                    self.lead.lost.cancel();
                    return Err(ControlError::LeadershipLost(format!(
                        "store fenced epoch {epoch}"
                    )));
                }
                Err(StoreError::Cancelled) => {
                    return Err(ControlError::LeadershipLost("store call cancelled".into()))
                }
                Err(e) => {
                    tracing::warn!(rollout = %self.rollout.plan.id, error = %e, "cannot store the roll-out; retrying");
                    tokio::select! {
                        biased;
                        _ = self.lead.lost.cancelled() => {
                            return Err(ControlError::LeadershipLost("leadership lost while storing the roll-out".into()));
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn now(&self) -> u64 {
        self.control.node().env.clock.wall_ms()
    }

    /// Carries one action out; a start answers with what became of it.
    async fn act(&mut self, a: RolloutAction) -> Result<Option<RolloutEvent>, ControlError> {
        let by = format!("roll-out {}", self.rollout.plan.id);
        let (pool, cmd) = match a {
            RolloutAction::Start { pool, plan_id } => return self.start(pool, plan_id).await,
            RolloutAction::Pause { pool } => (pool, UpgradeCommand::Pause),
            RolloutAction::Resume { pool } => (pool, UpgradeCommand::Resume),
            RolloutAction::Abort { pool } => (pool, UpgradeCommand::Abort),
        };
        let ours = self.rollout.plan.plan_id(&pool);
        let current = match self.control.upgrade(&pool).await {
            Ok(u) => u,
            Err(e) if is_lost(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(%pool, error = %e, "cannot read the pool's upgrade; the roll-out follows it on the next look");
                return Ok(None);
            }
        };
        // Only this roll-out's own plan is commanded, and only when the command changes it.
        let Some(u) = current.filter(|u| u.plan.id == ours && !u.is_terminal()) else {
            return Ok(None);
        };
        let paused = matches!(u.status, Status::Paused { .. });
        let wanted = match cmd {
            UpgradeCommand::Pause => !paused && !u.status.is_terminal(),
            UpgradeCommand::Resume => paused,
            _ => !u.status.is_terminal(),
        };
        if !wanted {
            return Ok(None);
        }
        match self.control.command(&pool, cmd, &by).await {
            Ok(_) | Err(ControlError::NoUpgrade(_)) => Ok(None),
            Err(e) if is_lost(&e) => Err(e),
            Err(e) => {
                tracing::warn!(%pool, ?cmd, error = %e, "the roll-out's command to the pool failed");
                Ok(None)
            }
        }
    }

    /// Starts `pool`'s upgrade as plan `plan_id`, unless that plan already went out.
    async fn start(
        &self,
        pool: String,
        plan_id: String,
    ) -> Result<Option<RolloutEvent>, ControlError> {
        let at_ms = self.now();
        let started = RolloutEvent::Started {
            pool: pool.clone(),
            at_ms,
        };
        if self.inherited.contains(&pool) {
            match self.control.upgrade(&pool).await {
                Ok(Some(u)) if u.plan.id == plan_id => return Ok(Some(started)),
                Ok(_) => {}
                Err(e) if is_lost(&e) => return Err(e),
                Err(e) => return Ok(Some(refused(pool, &e, true, at_ms))),
            }
            match progress::load_history(&self.control.node().env.store, &pool, 20).await {
                Ok(h) if h.iter().any(|p| p.plan_id == plan_id) => return Ok(Some(started)),
                Ok(_) => {}
                Err(e) => return Ok(Some(refused(pool, &e.into(), true, at_ms))),
            }
        }
        let mut req = self.rollout.plan.template.clone();
        req.pool = pool.clone();
        req.plan_id = Some(plan_id.clone());
        req.dry_run = false;
        let by = format!(
            "{} (roll-out {})",
            self.rollout.plan.started_by, self.rollout.plan.id
        );
        match self.control.start(req, &by).await {
            Ok(_) => {
                tracing::info!(rollout = %self.rollout.plan.id, %pool, plan = %plan_id, "pool started");
                Ok(Some(started))
            }
            Err(ControlError::AlreadyRunning { plan, .. }) if plan == plan_id => Ok(Some(started)),
            Err(e) if is_lost(&e) => Err(e),
            Err(e) => {
                // The store refusing writes may be fixed while the pool waits (its reason shown).
                let retry = matches!(
                    e,
                    ControlError::AlreadyRunning { .. }
                        | ControlError::PairedBusy { .. }
                        | ControlError::PairedFailedOver { .. }
                        | ControlError::TakingOver { .. }
                        | ControlError::StoreRefused(_)
                ) || e.is_retryable();
                tracing::warn!(rollout = %self.rollout.plan.id, %pool, error = %e, retry, "pool not started");
                Ok(Some(refused(pool, &e, retry, at_ms)))
            }
        }
    }

    /// What `pool`'s upgrade did that the roll-out has to know: ended, or paused while the
    /// roll-out runs. Read from its live driver's status (`live`, marked seen) when that shows
    /// this roll-out's plan, else from the store.
    async fn observe(
        &self,
        pool: &str,
        live: Option<&mut watch::Receiver<Option<Upgrade>>>,
    ) -> Result<Option<RolloutEvent>, ControlError> {
        let ours = self.rollout.plan.plan_id(pool);
        let at_ms = self.now();
        let keep = |e: &RolloutEvent| {
            !matches!(e, RolloutEvent::PoolPaused { .. })
                || self.rollout.status == crate::rollout::RolloutStatus::Running
        };
        if let Some(rx) = live {
            let seen = rx.borrow_and_update();
            if let Some(u) = seen.as_ref().filter(|u| u.plan.id == ours) {
                return Ok(outcome(pool, u, at_ms).filter(keep));
            }
        }
        let current = match self.control.upgrade(pool).await {
            Ok(u) => u,
            Err(e) if is_lost(&e) => return Err(e),
            Err(e) => {
                tracing::debug!(%pool, error = %e, "cannot read the pool's upgrade");
                return Ok(None);
            }
        };
        match current {
            Some(u) if u.plan.id == ours => Ok(outcome(pool, &u, at_ms).filter(keep)),
            // Another plan replaced ours: it ended, and its history says how.
            _ => {
                let past = progress::load_history(&self.control.node().env.store, pool, 100)
                    .await
                    .map_err(ControlError::from)?;
                let (completed, reason) = match past.iter().find(|p| p.plan_id == ours) {
                    Some(p) => (
                        p.outcome == "completed",
                        format!("{} {}", p.outcome, p.reason).trim().to_owned(),
                    ),
                    None => (
                        false,
                        format!("its upgrade (plan {ours}) is no longer stored"),
                    ),
                };
                Ok(Some(RolloutEvent::PoolEnded {
                    pool: pool.to_owned(),
                    completed,
                    reason,
                    at_ms,
                }))
            }
        }
    }
}

/// The event an upgrade's state means to the roll-out, if any.
fn outcome(pool: &str, u: &Upgrade, at_ms: u64) -> Option<RolloutEvent> {
    if u.is_terminal() {
        let completed = u.status == Status::Completed;
        return Some(RolloutEvent::PoolEnded {
            pool: pool.to_owned(),
            completed,
            reason: if completed {
                String::new()
            } else {
                format!("upgrade {}", u.status)
            },
            at_ms,
        });
    }
    match &u.status {
        Status::Paused { reason } => Some(RolloutEvent::PoolPaused {
            pool: pool.to_owned(),
            reason: reason.clone(),
        }),
        _ => None,
    }
}

fn refused(pool: String, e: &ControlError, retry: bool, at_ms: u64) -> RolloutEvent {
    RolloutEvent::StartRefused {
        pool,
        reason: e.to_string(),
        retry,
        at_ms,
    }
}

fn is_lost(e: &ControlError) -> bool {
    matches!(
        e,
        ControlError::LeadershipLost(_) | ControlError::NotLeader { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StartRequest;
    use crate::rollout::{RolloutPlan, Stage};

    fn rollout(status: RolloutStatus, stages: &[(&str, Stage)]) -> Rollout {
        let pools: Vec<String> = stages.iter().map(|(p, _)| (*p).to_owned()).collect();
        let (mut r, _) = Rollout::new(RolloutPlan {
            id: "rollout-1700000000000".into(),
            pools,
            paired: Default::default(),
            canary: None,
            max_in_flight: 3,
            template: StartRequest::default(),
            started_by: "operator/t".into(),
            started_ms: 1,
        });
        r.status = status;
        for (pool, stage) in stages {
            if let Some(p) = r.pools.get_mut(*pool) {
                p.stage = stage.clone();
            }
        }
        r
    }

    /// Found by the roll-out simulation (seed 6602): a leader that stored "aborted" and died
    /// before aborting every running pool left one paused for ever, and the roll-out with it.
    #[test]
    fn a_new_leader_carries_out_a_stored_pause_or_abort_on_the_running_pools() {
        let stages = [
            ("pool-a", Stage::Completed),
            ("pool-b", Stage::Running),
            ("pool-c", Stage::Starting),
            ("pool-d", Stage::Running),
        ];
        let aborted = RolloutStatus::Aborted {
            reason: "aborted by operator/t".into(),
        };
        let actions = RolloutDriver::resumed_actions(&rollout(aborted, &stages));
        for pool in ["pool-b", "pool-d"] {
            assert!(
                actions.contains(&RolloutAction::Abort { pool: pool.into() }),
                "{actions:?}"
            );
        }
        assert!(actions
            .iter()
            .any(|a| matches!(a, RolloutAction::Start { pool, .. } if pool == "pool-c")));
        let paused = RolloutStatus::Paused {
            reason: "paused by operator/t".into(),
        };
        let actions = RolloutDriver::resumed_actions(&rollout(paused, &stages));
        assert!(actions.contains(&RolloutAction::Pause {
            pool: "pool-b".into()
        }));
        assert!(!actions
            .iter()
            .any(|a| matches!(a, RolloutAction::Abort { .. })));
        // A running roll-out resumes its starts only.
        let actions = RolloutDriver::resumed_actions(&rollout(RolloutStatus::Running, &stages));
        assert_eq!(actions.len(), 1, "{actions:?}");
    }
}
