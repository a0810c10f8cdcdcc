//! The driver: the I/O shell around the pure engine. It feeds the engine events (agent step
//! results, readiness answers, operator commands, timers) and **stores, in one fenced
//! transaction, a state that accounts for everything it is about to carry out before** it
//! carries it out: agent calls carrying the leader's epoch, the failover hook, timers, operator
//! replies. It writes only the difference from what is stored (see `progress`): a chain's later
//! steps are accounted for by its stored first step, a readiness read or a record needs nothing
//! stored first. A leader that dies at any point therefore leaves a stored state that accounts
//! for every command it sent, and the next leader resumes from it with the same operation ids.
//!
//! If the store says the leader is fenced, or an agent says the epoch is stale, the driver stops
//! at once: a newer leader owns the upgrade.

use crate::config::{PoolConfig, PoolSpec};
use crate::engine::{
    bounds, Action, Direction, DrainMode, Event, Outcome, Plan, PoolState, Step, Upgrade,
};
use crate::env::Env;
use crate::link::{AgentCommand, AgentLimits, LinkError, OpState};
use crate::progress::{self, EventRecord, FailoverRecord, UpgradeRecord};
use crate::readiness::{self, AgentState, Clocks};
use crate::store::{Leadership, StoreError, WriteOp};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;

/// A command from the control layer to a running driver.
#[derive(Debug)]
pub struct Command {
    /// The engine event (Pause, Resume, Abort, Rollback).
    pub event: Event,
    /// Answered once the state after the event is stored.
    pub reply: oneshot::Sender<Result<Upgrade, DriveError>>,
}

/// Why a driver stopped before its upgrade ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DriveError {
    /// Leadership was lost (fenced write, stale epoch, lease lost): a newer leader resumes.
    #[error("leadership lost: {0}")]
    LeadershipLost(String),
    /// The store refused a new plan's first write for space or size: nothing was stored
    /// and nothing acted; the plan is not started.
    #[error("the store refused the plan: {0}")]
    Refused(String),
}

/// Why a driver's writes are held (the store refuses them for space or size), while they are:
/// shown in the upgrade's status.
pub type Held = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// What a write refused for space or size does.
#[derive(Clone, Copy)]
enum OnRefused<'a> {
    /// Hold (nothing acts until it lands), say why in `held`, and try again; the status's
    /// watchers are woken when the hold starts and when it ends, so that `upgrade watch` shows
    /// it at once rather than with the next change of the upgrade.
    Hold(&'a Held, &'a watch::Sender<Option<Upgrade>>),
    /// Give up: the caller has nothing stored to hold on to.
    Fail,
}

/// The longest deadline given to one agent call: far beyond any step the plan bounds allow,
/// and small enough for gRPC's timeout header (which cannot carry "years").
const MAX_CALL: Duration = Duration::from_secs(3 * 24 * 3600);

/// Room for the network and the agent's own bookkeeping on top of a step's limits.
const SLACK: Duration = Duration::from_secs(30);

/// Applies `txns` in order, each one fenced transaction, retrying while the store is
/// unavailable (each write is idempotent: same keys, same values). A write whose answer was
/// lost may have committed; writing it again is harmless.
async fn store_txns(
    env: &Env,
    lead: &Leadership,
    txns: Vec<Vec<WriteOp>>,
    refused: OnRefused<'_>,
) -> Result<(), DriveError> {
    for ops in txns {
        write_fenced(env, lead, ops, refused).await?;
    }
    Ok(())
}

/// How often a write refused for space or size is tried again.
const HELD_RETRY: Duration = Duration::from_secs(5);

/// What a driver shares with readers while it runs.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// Its history records not stored yet.
    pub pending: Pending,
    /// Why its writes are held, while they are.
    pub held: Held,
}

/// Locks `held`; a panicked holder left a value, still usable.
pub fn lock_held(held: &Held) -> std::sync::MutexGuard<'_, Option<String>> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// A driver's history records not stored yet, readable by the control layer.
pub type Pending = std::sync::Arc<std::sync::Mutex<Vec<EventRecord>>>;

/// Locks `pending`; a reader that panicked holding it left a vector, still usable.
pub fn lock_pending(pending: &Pending) -> std::sync::MutexGuard<'_, Vec<EventRecord>> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long history records may wait for a state write to carry them before they are written
/// on their own. A chain's steps are not stored one by one (see `progress`), so its records
/// wait for the state that ends it: the leader shows them from memory meanwhile (see
/// `Control::events`); followers see them once written, and a leader that dies loses at most
/// this much (its successor's replay of the chain records it again).
const EVENT_FLUSH: Duration = Duration::from_secs(30);

async fn write_fenced(
    env: &Env,
    lead: &Leadership,
    ops: Vec<WriteOp>,
    refused: OnRefused<'_>,
) -> Result<(), DriveError> {
    let mut backoff = Duration::from_millis(50);
    loop {
        if lead.lost.is_cancelled() {
            return Err(DriveError::LeadershipLost("lease lost".into()));
        }
        let started = std::time::Instant::now();
        let written = env.store.fenced_write(lead, ops.clone()).await;
        crate::metrics::METRICS.store_write(
            started.elapsed(),
            written.as_ref().err().map(|e| match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Fenced { .. } => "fenced",
                StoreError::Denied(_) => "denied",
                StoreError::Quota(_) => "quota",
                StoreError::TooLarge(_) => "too_large",
                StoreError::Broken(_) => "broken",
                _ => "other",
            }),
        );
        match written {
            Ok(_) => {
                if let OnRefused::Hold(h, wake) = &refused {
                    let was = lock_held(h).take();
                    if was.is_some() {
                        wake.send_modify(|_| {});
                    }
                }
                return Ok(());
            }
            Err(StoreError::Fenced { epoch }) => {
                lead.lost.cancel();
                return Err(DriveError::LeadershipLost(format!(
                    "store fenced epoch {epoch}"
                )));
            }
            // Out of space, too large, or an embedded store whose disk failed: stepping down
            // would hand the same write to the next leader (or to nobody). Nothing is carried
            // out until it lands (store first, then act), so the upgrade holds where it is,
            // said loudly, and the write is tried again slowly: an operator frees space, raises
            // the limit or restarts the coordinator, and it goes on.
            Err(e @ (StoreError::Quota(_) | StoreError::TooLarge(_) | StoreError::Broken(_))) => {
                let OnRefused::Hold(h, wake) = &refused else {
                    return Err(DriveError::Refused(e.to_string()));
                };
                let was = lock_held(h).replace(format!(
                    "the store refuses this upgrade's writes ({e}); nothing acts until one lands, \
                     tried again every {}s",
                    HELD_RETRY.as_secs()
                ));
                if was.is_none() {
                    wake.send_modify(|_| {});
                }
                tracing::error!(error = %e, "progress write refused; the upgrade holds until it lands");
                tokio::select! {
                    biased;
                    _ = lead.lost.cancelled() => {
                        return Err(DriveError::LeadershipLost("lease lost while holding a write".into()))
                    }
                    _ = tokio::time::sleep(HELD_RETRY) => {}
                }
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "progress write failed; retrying");
                tokio::select! {
                    biased;
                    _ = lead.lost.cancelled() => {
                        return Err(DriveError::LeadershipLost("lease lost while retrying a write".into()))
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                lead.lost.cancel();
                return Err(DriveError::LeadershipLost(format!(
                    "progress write failed: {e}"
                )));
            }
        }
    }
}

/// What a spawned task is doing, so that a task that panics is turned into an answer.
#[derive(Debug, Clone)]
enum Task {
    Step {
        server: String,
        step: Step,
        attempt: u32,
    },
    Readiness,
    Failover,
    Soak,
}

/// Drives one pool's upgrade until it ends or leadership is lost.
pub struct Driver {
    env: Env,
    lead: Leadership,
    pool: PoolConfig,
    record: UpgradeRecord,
    /// Records of transitions not stored yet (they go with the next stored state, or after
    /// [`EVENT_FLUSH`]); shared with readers, so the leader shows them at once.
    unstored: Pending,
    /// When the oldest of `unstored` was made.
    unstored_since: Option<Instant>,
    /// What is in the store for this pool: a write carries only the difference.
    stored: progress::Stored,
    status: watch::Sender<Option<Upgrade>>,
    /// Why its writes are held, while they are.
    held: Held,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    work: JoinSet<()>,
    tasks: HashMap<Id, Task>,
}

impl Driver {
    /// A driver for `record`, publishing its state on `status`. `stored` is what the store
    /// holds of it: [`progress::Stored::of`] the record read at take-over, or nothing
    /// (`Default`) for a new plan, which the first transition stores.
    pub fn new(
        env: Env,
        lead: Leadership,
        pool: PoolConfig,
        record: UpgradeRecord,
        stored: progress::Stored,
        status: watch::Sender<Option<Upgrade>>,
        shared: Shared,
    ) -> Driver {
        let Shared {
            pending: unstored,
            held,
        } = shared;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        status.send_replace(Some(record.upgrade.clone()));
        Driver {
            env,
            lead,
            pool,
            record,
            unstored,
            unstored_since: None,
            stored,
            status,
            held,
            events_tx,
            events_rx,
            work: JoinSet::new(),
            tasks: HashMap::new(),
        }
    }

    /// Carries out `initial` (from `Upgrade::new`, answering `started` once stored, or from
    /// `resume()` with `reconcile`: each in-flight step reads the agent's journal first), then
    /// every event until the upgrade ends.
    pub async fn run(
        mut self,
        initial: Vec<Action>,
        reconcile: bool,
        started: Option<oneshot::Sender<Result<Upgrade, DriveError>>>,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<Upgrade, DriveError> {
        self.handle(initial, started, reconcile).await?;
        loop {
            if self.record.upgrade.is_terminal() {
                self.store_now(true).await?;
                return Ok(self.record.upgrade.clone());
            }
            let flush_at = self.unstored_since.map(|t| t + EVENT_FLUSH);
            tokio::select! {
                biased;
                _ = self.lead.lost.cancelled() => {
                    return Err(DriveError::LeadershipLost("lease lost".into()))
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                    self.store_now(true).await?;
                }
                Some(joined) = self.work.join_next_with_id(), if !self.work.is_empty() => {
                    self.joined(joined).await?;
                }
                Some(ev) = self.events_rx.recv() => {
                    // Answers that arrived together are stored together: one transaction for
                    // all their states, still before any of their actions (group commit).
                    let mut batch = vec![ev];
                    while let Ok(ev) = self.events_rx.try_recv() {
                        batch.push(ev);
                    }
                    self.apply_all(batch).await?;
                }
                Some(cmd) = commands.recv() => self.apply(cmd.event, Some(cmd.reply)).await?,
            }
        }
    }

    async fn apply(
        &mut self,
        ev: Event,
        reply: Option<oneshot::Sender<Result<Upgrade, DriveError>>>,
    ) -> Result<(), DriveError> {
        let (next, actions) = self.record.upgrade.clone().step(ev);
        self.record.upgrade = next;
        self.handle(actions, reply, false).await
    }

    async fn apply_all(&mut self, batch: Vec<Event>) -> Result<(), DriveError> {
        let mut all = Vec::new();
        let mut store = false;
        for ev in batch {
            let (next, actions) = self.record.upgrade.clone().step(ev);
            self.record.upgrade = next;
            store |= must_store(&actions);
            all.extend(actions);
        }
        self.handle_stored(all, None, false, store).await
    }

    /// A task ended: a panic becomes an answer, so no server waits forever for it.
    async fn joined(&mut self, joined: Result<(Id, ()), JoinError>) -> Result<(), DriveError> {
        let (id, failure) = match joined {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(panic_message(e))),
        };
        let task = self.tasks.remove(&id);
        let (Some(task), Some(why)) = (task, failure) else {
            return Ok(());
        };
        tracing::error!(pool = %self.pool.name, ?task, %why, "a driver task failed");
        let ev = match task {
            Task::Step {
                server,
                step,
                attempt,
            } => Event::StepDone {
                server,
                step,
                attempt,
                outcome: Outcome::Unknown {
                    message: format!("internal error: the {step} task failed: {why}"),
                },
            },
            Task::Failover => Event::FailoverDone {
                ok: false,
                message: format!("internal error: the failover task failed: {why}"),
            },
            Task::Readiness | Task::Soak => Event::Internal {
                message: format!("a {task:?} task failed: {why}"),
            },
        };
        self.apply(ev, None).await
    }

    /// Stores the state when an action needs it (or an operator waits for the answer), then
    /// answers, then carries the actions out.
    async fn handle(
        &mut self,
        actions: Vec<Action>,
        reply: Option<oneshot::Sender<Result<Upgrade, DriveError>>>,
        reconcile: bool,
    ) -> Result<(), DriveError> {
        let store = must_store(&actions);
        self.handle_stored(actions, reply, reconcile, store).await
    }

    async fn handle_stored(
        &mut self,
        actions: Vec<Action>,
        reply: Option<oneshot::Sender<Result<Upgrade, DriveError>>>,
        reconcile: bool,
        store: bool,
    ) -> Result<(), DriveError> {
        let (actions, store) = self.answer_gates(actions, store);
        self.collect_records(&actions);
        // A transition that only records (a server done while others of its domain still
        // run, a server failed on the way to a pause stored next) leaves nothing a new leader
        // needs that a replay of the stored chain would not give it again: it is stored with
        // the next one that acts, unless the upgrade's own status or position moved.
        let only_records = actions.iter().all(|a| matches!(a, Action::Record { .. }));
        let store =
            store && (!only_records || progress::cursor_changed(&self.stored, &self.record));
        if reply.is_some() || store {
            // An operator's answer shows its records at once; otherwise they may wait for the
            // next state that needs writing.
            if let Err(e) = self.store_now(reply.is_some()).await {
                if let DriveError::Refused(_) = e {
                    // Never stored: readers must not see this plan as the pool's upgrade.
                    self.status.send_replace(None);
                }
                if let Some(r) = reply {
                    let _ = r.send(Err(e.clone()));
                }
                return Err(e);
            }
        }
        self.status.send_replace(Some(self.record.upgrade.clone()));
        if let Some(r) = reply {
            let _ = r.send(Ok(self.record.upgrade.clone()));
        }
        for a in actions {
            self.dispatch(a, reconcile);
        }
        Ok(())
    }

    /// Answers on the spot the readiness checks among `actions` that need nothing the spawned
    /// check does: asked with no delay, every server of the plan the upgrade has not taken
    /// down last reported serving and accepting (nothing to refresh), and the pool is Ready
    /// with the domain free to go down (nothing to wait out or confirm). Each answer is fed to
    /// the engine at once, which takes that one server down and may ask again for the next
    /// prepared server; that check counts the servers taken down before it as down, exactly
    /// as if it had waited for their state to be stored, so every server still goes down on a
    /// check of its own (review finding #6). The states are then stored in one transaction
    /// before any of their actions run: the servers of a domain go down one store write
    /// apart no more. Any other answer goes the usual way (a spawned check), which refreshes,
    /// waits out stabilisation and confirms InsufficientActiveFrontEnds.
    fn answer_gates(&mut self, mut actions: Vec<Action>, mut store: bool) -> (Vec<Action>, bool) {
        // Each answer takes a server down, so the plan's size bounds the rounds.
        let rounds = self.record.upgrade.plan.servers().count();
        for _ in 0..rounds {
            if self.lead.lost.is_cancelled() {
                break;
            }
            let Some(pos) = actions
                .iter()
                .position(|a| matches!(a, Action::CheckReadiness { after, .. } if after.is_zero()))
            else {
                break;
            };
            let Action::CheckReadiness { id, domain, .. } = &actions[pos] else {
                break;
            };
            let Some(ev) = self.ready_now(*id, domain) else {
                break;
            };
            actions.remove(pos);
            let (next, more) = self.record.upgrade.clone().step(ev);
            self.record.upgrade = next;
            store |= must_store(&more);
            actions.extend(more);
        }
        (actions, store)
    }

    /// The gate's answer to check `id` on `domain` from the state in hand (not yet stored),
    /// if it is Ready for the domain and needed no fresh report.
    fn ready_now(&self, id: u64, domain: &str) -> Option<Event> {
        let up = &self.record.upgrade;
        let spec = PoolSpec::for_plan(&up.plan, Some(&self.pool));
        let down: BTreeSet<String> = up.down_servers().into_iter().collect();
        if !not_serving(&self.env, &spec, &down).is_empty() {
            return None;
        }
        let ev = answer(id, domain, &gate(&self.env, &spec, &down));
        let ready = matches!(
            ev,
            Event::Readiness {
                state: PoolState::Ready,
                domain_ready: true,
                ..
            }
        );
        ready.then_some(ev)
    }

    fn collect_records(&mut self, actions: &[Action]) {
        let plan_id = self.record.upgrade.plan.id.clone();
        for a in actions {
            if let Action::Record {
                kind,
                server,
                domain,
                message,
            } = a
            {
                let r = EventRecord {
                    seq: self.record.next_event,
                    at_ms: self.env.clock.wall_ms(),
                    plan_id: plan_id.clone(),
                    epoch: self.lead.epoch.get(),
                    coordinator: self.env.me.clone(),
                    kind: kind.clone(),
                    server: server.clone().unwrap_or_default(),
                    domain: domain.clone().unwrap_or_default(),
                    message: message.clone(),
                };
                tracing::info!(pool = %self.pool.name, kind = %r.kind, server = %r.server, domain = %r.domain, "{}", r.message);
                self.record.next_event = self.record.next_event.saturating_add(1);
                lock_pending(&self.unstored).push(r);
                self.unstored_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Writes what the store lacks of the state, with the records waiting; with
    /// `flush_events`, the records even when the state needs nothing.
    async fn store_now(&mut self, flush_events: bool) -> Result<(), DriveError> {
        // Only this driver adds records, and not while it awaits the write: what it writes is
        // exactly what it removes afterwards.
        let unstored = lock_pending(&self.unstored).clone();
        let flush_events = flush_events || unstored.len() >= progress::MAX_EVENT_BATCH;
        if !flush_events && !progress::needs_write(&self.stored, &self.record) {
            return Ok(());
        }
        let writes = progress::upgrade_writes(&self.stored, &self.record, &unstored);
        // A new plan whose first write is refused is not started (the operator is told at
        // once); anything already stored holds until the store takes it.
        let refused = if self.stored == progress::Stored::default() {
            OnRefused::Fail
        } else {
            OnRefused::Hold(&self.held, &self.status)
        };
        store_txns(&self.env, &self.lead, writes.txns, refused).await?;
        self.stored = writes.stored;
        lock_pending(&self.unstored).clear();
        self.unstored_since = None;
        Ok(())
    }

    fn spawn(&mut self, task: Task, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = self.work.spawn(fut);
        self.tasks.insert(handle.id(), task);
    }

    fn dispatch(&mut self, action: Action, reconcile: bool) {
        match action {
            Action::Record { .. } => {}
            Action::Finished { status } => {
                tracing::info!(pool = %self.pool.name, %status, "upgrade finished")
            }
            Action::CheckReadiness { id, domain, after } => {
                let (env, cfg, tx, stop) = (
                    self.env.clone(),
                    self.pool.clone(),
                    self.events_tx.clone(),
                    self.lead.lost.clone(),
                );
                let state = self.status.subscribe();
                self.spawn(Task::Readiness, async move {
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => {}
                        ev = check_readiness(&env, &cfg, state, id, &domain, after) => {
                            let _ = tx.send(ev);
                        }
                    }
                });
            }
            Action::RunStep {
                server,
                step,
                direction,
                op_id,
                attempt,
            } => {
                let call = StepCall {
                    env: self.env.clone(),
                    lead: self.lead.clone(),
                    command: command_for(&self.record.upgrade.plan, step, direction),
                    server: server.clone(),
                    step,
                    op_id,
                    attempt,
                    reconcile,
                };
                let tx = self.events_tx.clone();
                let task = Task::Step {
                    server,
                    step,
                    attempt,
                };
                self.spawn(task, async move {
                    let started = std::time::Instant::now();
                    if let Some(ev) = call.run().await {
                        if let Event::StepDone { step, outcome, .. } = &ev {
                            let result = match outcome {
                                Outcome::Succeeded { .. } => "succeeded",
                                Outcome::Failed { .. } => "failed",
                                Outcome::Unknown { .. } => "unknown",
                            };
                            crate::metrics::METRICS.step(step.name(), result, started.elapsed());
                        }
                        let _ = tx.send(ev);
                    }
                });
            }
            Action::Failover { pool, paired } => {
                let (env, lead, cfg, tx) = (
                    self.env.clone(),
                    self.lead.clone(),
                    self.pool.clone(),
                    self.events_tx.clone(),
                );
                self.spawn(Task::Failover, async move {
                    let r = fail_over(&env, &lead, &cfg, &paired, true, "upgrade").await;
                    if lead.lost.is_cancelled() {
                        return;
                    }
                    let (ok, message) = match r {
                        Ok(m) => (true, m),
                        Err(m) => (false, m),
                    };
                    tracing::info!(%pool, ok, %message, "failover hook finished");
                    let _ = tx.send(Event::FailoverDone { ok, message });
                });
            }
            Action::AwaitWindow { domain } => {
                let (tx, stop) = (self.events_tx.clone(), self.lead.lost.clone());
                let (clock, windows) = (
                    std::sync::Arc::clone(&self.env.clock),
                    self.record.upgrade.plan.windows.clone(),
                );
                self.spawn(Task::Soak, async move {
                    loop {
                        let wait = crate::engine::window::ms_until_open(&windows, clock.wall_ms());
                        if wait == 0 {
                            let _ = tx.send(Event::WindowOpen);
                            return;
                        }
                        tracing::debug!(%domain, wait_ms = wait, "outside the maintenance windows");
                        // Looked at again at least every minute: the wall clock may be set.
                        let nap = Duration::from_millis(wait).min(Duration::from_secs(60));
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(nap) => {}
                        }
                    }
                });
            }
            Action::Soak { after } => {
                let (tx, stop) = (self.events_tx.clone(), self.lead.lost.clone());
                self.spawn(Task::Soak, async move {
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(after.min(MAX_CALL)) => { let _ = tx.send(Event::SoakDone); }
                    }
                });
            }
        }
    }
}

/// Whether the state that produced `actions` must be stored before they are carried out. The
/// one transition that may wait is a server prepared and the gate asked at once (a read): it is
/// stored with the next one, which saves a write per server on the critical path. Every other
/// transition is stored, including one with nothing to do next (a pause, a failure).
fn must_store(actions: &[Action]) -> bool {
    let read_only_gate = actions
        .iter()
        .any(|a| matches!(a, Action::CheckReadiness { after, .. } if after.is_zero()));
    !read_only_gate || actions.iter().any(Action::needs_stored_state)
}

fn panic_message(e: JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".into()
    }
}

/// Evaluates readiness for `domain` after `after`, on the plan's fixed domains, with the
/// servers the upgrade has taken down counted as down. Busy caused only by the stabilisation
/// window is waited out rather than answered, so that it never counts as a Busy answer.
pub async fn check_readiness(
    env: &Env,
    cfg: &PoolConfig,
    state: watch::Receiver<Option<Upgrade>>,
    id: u64,
    domain: &str,
    after: Duration,
) -> Event {
    tokio::time::sleep(after.min(MAX_CALL)).await;
    // InsufficientActiveFrontEnds triggers failover or a pause at once, so it is confirmed
    // first: a new leader's inventory, or a health stream that is reconnecting, can briefly
    // show servers as lost that are in fact serving. The window outlasts a short partition
    // between this leader and the agents: what the leader cannot see is unknown, not absent.
    let confirm_until = Instant::now() + env.lost_after * 2 + Duration::from_secs(10);
    let mut refresh_all = false;
    loop {
        let Some(up) = state.borrow().clone() else {
            return Event::Internal {
                message: "readiness asked without an upgrade".into(),
            };
        };
        let spec = PoolSpec::for_plan(&up.plan, Some(cfg));
        let down: BTreeSet<String> = up.down_servers().into_iter().collect();
        let stale = if refresh_all {
            spec.servers()
                .filter(|s| !down.contains(*s))
                .cloned()
                .collect()
        } else {
            not_serving(env, &spec, &down)
        };
        env.agents.refresh(stale).await;
        let r = gate(env, &spec, &down);
        if r.state == PoolState::Busy && r.busy_only_stabilising {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if r.state == PoolState::InsufficientActiveFrontEnds && Instant::now() < confirm_until {
            tokio::time::sleep(Duration::from_millis(250)).await;
            refresh_all = true;
            continue;
        }
        return answer(id, domain, &r);
    }
}

/// The servers of `spec` whose last report is not serving and accepting, the upgrade's own
/// down servers left out: those the gate asks for a fresh report before it answers. Servers
/// the upgrade has taken down count as inactive whatever they report, so they are not asked
/// again: with a whole domain going down at once, asking each one (a full probe on a server
/// that is draining) made every server's gate wait for the slowest.
fn not_serving(env: &Env, spec: &PoolSpec, down: &BTreeSet<String>) -> Vec<String> {
    let health = env.agents.health_of(&spec.servers().collect::<Vec<_>>());
    spec.servers()
        .filter(|s| !down.contains(*s))
        .filter(|s| {
            health
                .get(*s)
                .is_none_or(|h| h.state != AgentState::Serving || !h.accepting)
        })
        .cloned()
        .collect()
}

/// The engine's event for the gate's answer `r` to check `id` on `domain`.
fn answer(id: u64, domain: &str, r: &readiness::PoolReadiness) -> Event {
    let domain_ready = r.domain(domain).is_some_and(|d| d.ready_for_upgrade);
    let reason = match r.domain(domain) {
        Some(d) if r.state == PoolState::Ready => {
            format!("{}; {}: {}", r.reason, domain, d.reason)
        }
        _ => r.reason.clone(),
    };
    Event::Readiness {
        id,
        state: r.state,
        domain_ready,
        reason,
    }
}

fn clocks(env: &Env) -> Clocks {
    Clocks {
        now_ms: env.agents.now_ms(),
        lost_after_ms: u64::try_from(env.lost_after.as_millis()).unwrap_or(u64::MAX),
        stabilization_ms: u64::try_from(env.stabilization.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Readiness of a pool now, from the agents' last reports, with a row per server.
pub fn evaluate(
    env: &Env,
    spec: &PoolSpec,
    going_down: &BTreeSet<String>,
    operation_running: bool,
) -> readiness::PoolReadiness {
    env.agents
        .readiness(spec, clocks(env), going_down, operation_running, true)
}

/// The upgrade's gate: the same judgement without the per-server rows, which the live model
/// answers from its counters.
pub fn gate(env: &Env, spec: &PoolSpec, going_down: &BTreeSet<String>) -> readiness::PoolReadiness {
    env.agents
        .readiness(spec, clocks(env), going_down, false, false)
}

/// Runs the failover (or failback) hook for the leader at `lead` and records where the pool's
/// traffic is, fenced. The hook is not started once leadership is known to be lost.
pub async fn fail_over(
    env: &Env,
    lead: &Leadership,
    cfg: &PoolConfig,
    paired: &str,
    over: bool,
    by: &str,
) -> Result<String, String> {
    if lead.lost.is_cancelled() {
        return Err("leadership lost before the hook ran".into());
    }
    let message = env.hooks.run(cfg, paired, over, lead.epoch).await?;
    let record = FailoverRecord {
        failed_over: over,
        paired_pool: paired.to_string(),
        at_ms: env.clock.wall_ms(),
        by: by.to_string(),
        epoch: lead.epoch.get(),
    };
    write_fenced(
        env,
        lead,
        vec![progress::failover_write(&cfg.name, &record)],
        OnRefused::Fail,
    )
    .await
    .map_err(|e| format!("the hook ran but could not be recorded: {e}"))?;
    Ok(message)
}

/// What `step` of a `direction` chain asks of the agent under `plan`.
pub fn command_for(plan: &Plan, step: Step, direction: Direction) -> AgentCommand {
    match (step, direction) {
        (Step::Prepare, Direction::Backward) => AgentCommand::PrepareRollback {
            from_version: plan.version.clone(),
            fallback: plan.rollback_artifact.clone(),
        },
        (Step::Prepare, _) => AgentCommand::PrepareInstall {
            artifact: plan.artifact.clone(),
            sha256: plan.sha256.clone(),
            version: plan.version.clone(),
        },
        (Step::Drain, _) => AgentCommand::Drain {
            timeout: match plan.drain {
                DrainMode::Graceful { timeout } => timeout.min(bounds::MAX_STEP_WAIT),
                DrainMode::Immediate => Duration::ZERO,
            },
        },
        (Step::Stop, _) => AgentCommand::Stop,
        (Step::Install, _) => AgentCommand::Install {
            artifact: plan.artifact.clone(),
            sha256: plan.sha256.clone(),
            version: plan.version.clone(),
        },
        (Step::Rollback, _) => AgentCommand::Rollback {
            from_version: plan.version.clone(),
            fallback: plan.rollback_artifact.clone(),
        },
        (Step::Restart, _) => AgentCommand::Restart {
            // A server that is accepting when its restart begins (a restart that timed out
            // came up and took traffic) is drained first, unless this is a declared outage.
            drain_first: match plan.drain {
                DrainMode::Graceful { timeout } => Some(timeout.min(bounds::MAX_STEP_WAIT)),
                DrainMode::Immediate => None,
            },
        },
        (Step::Verify, _) => AgentCommand::Verify {
            stable: plan.verify_stable.min(bounds::MAX_STEP_WAIT),
            timeout: plan.verify_timeout.min(bounds::MAX_STEP_WAIT),
        },
    }
}

/// How long `command` may take on an agent with `limits`, before the coordinator stops waiting
/// for an answer and asks the agent's journal instead. Never a failure by itself.
pub fn deadline(command: &AgentCommand, limits: AgentLimits) -> Duration {
    // Saturating: a corrupt stored value must not overflow into a panic.
    let hooks = |n: u32| limits.hook.saturating_mul(n);
    let d = match command {
        AgentCommand::PrepareInstall { .. } | AgentCommand::PrepareRollback { .. } => limits.fetch,
        AgentCommand::Drain { timeout } => timeout.saturating_add(hooks(2)),
        AgentCommand::Stop => limits.hook,
        AgentCommand::Install { .. } | AgentCommand::Rollback { .. } => {
            limits.fetch.saturating_add(limits.install)
        }
        AgentCommand::Restart { drain_first } => drain_first
            .unwrap_or_default()
            .saturating_add(hooks(3))
            .saturating_add(limits.start),
        AgentCommand::Verify { timeout, .. } => *timeout,
    };
    d.saturating_add(SLACK).min(MAX_CALL)
}

struct StepCall {
    env: Env,
    lead: Leadership,
    command: AgentCommand,
    server: String,
    step: Step,
    op_id: String,
    attempt: u32,
    reconcile: bool,
}

impl StepCall {
    fn done(&self, outcome: Outcome) -> Event {
        Event::StepDone {
            server: self.server.clone(),
            step: self.step,
            attempt: self.attempt,
            outcome,
        }
    }

    fn limits(&self) -> AgentLimits {
        self.env
            .agents
            .health_of(&[&self.server])
            .get(&self.server)
            .and_then(|h| h.limits)
            .unwrap_or_default()
    }

    /// The journal's answer, if the agent has a final one.
    fn final_answer(&self, state: OpState, message: String) -> Option<Event> {
        match state {
            OpState::Succeeded => Some(self.done(Outcome::Succeeded { message })),
            OpState::Failed => Some(self.done(Outcome::Failed { message })),
            OpState::Running | OpState::Interrupted => None,
        }
    }

    /// Calls the agent until it answers; `None` when leadership was lost (nothing to report).
    /// A call that times out or cannot connect is not a failure: the agent's journal is asked,
    /// and the same operation id is sent again (it attaches to a run under way, or runs once if
    /// it never arrived). Only when the agent stays unreachable past the step's deadline is the
    /// outcome reported unknown.
    async fn run(self) -> Option<Event> {
        if self.reconcile {
            // A new leader reads the agent's journal before acting, instead of re-issuing blindly.
            if let Ok(r) = self.env.agents.operation(&self.server, &self.op_id).await {
                if let Some(ev) =
                    self.final_answer(r.state, format!("(from the agent's journal) {}", r.message))
                {
                    return Some(ev);
                }
            }
        }
        let deadline = deadline(&self.command, self.limits());
        let mut unreachable_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = tokio::select! {
                biased;
                _ = self.lead.lost.cancelled() => return None,
                r = self.env.agents.run(&self.server, &self.op_id, self.lead.epoch, &self.command, deadline) => r,
            };
            let err = match res {
                Ok(r) => match self.final_answer(r.state, r.message.clone()) {
                    Some(ev) => return Some(ev),
                    None => LinkError::Retryable(format!(
                        "the agent answered {:?}: {}",
                        r.state, r.message
                    )),
                },
                Err(e) => e,
            };
            match err {
                LinkError::StaleEpoch { current, .. } => {
                    tracing::warn!(server = %self.server, current, "an agent has seen a newer leader: stepping down");
                    self.lead.lost.cancel();
                    return None;
                }
                e if !e.is_retryable() => {
                    let message = format!("{} refused: {e}", self.step);
                    return Some(self.done(Outcome::Failed { message }));
                }
                e => {
                    // No answer is not a failure: ask the journal what happened.
                    let mut reached = !e.is_unreachable();
                    match self.env.agents.operation(&self.server, &self.op_id).await {
                        Ok(r) => {
                            if let Some(ev) = self.final_answer(r.state, r.message) {
                                return Some(ev);
                            }
                            reached = true;
                        }
                        Err(LinkError::NotFound(_)) => reached = true,
                        Err(_) => {}
                    }
                    if reached {
                        unreachable_since = None;
                    } else {
                        let since = *unreachable_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= deadline {
                            let message = format!(
                                "agent unreachable for {} (limit {} for a {}): {e}",
                                humantime::format_duration(round_s(since.elapsed())),
                                humantime::format_duration(round_s(deadline)),
                                self.step
                            );
                            return Some(self.done(Outcome::Unknown { message }));
                        }
                    }
                    tracing::debug!(server = %self.server, op = %self.op_id, error = %e, "no answer yet; asking again with the same operation id");
                    tokio::select! {
                        biased;
                        _ = self.lead.lost.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

fn round_s(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_derive_from_agent_limits_and_stay_encodable() {
        let limits = AgentLimits {
            hook: Duration::from_secs(10),
            install: Duration::from_secs(100),
            start: Duration::from_secs(20),
            fetch: Duration::from_secs(50),
        };
        let install = AgentCommand::Install {
            artifact: "a".into(),
            sha256: "b".into(),
            version: "2".into(),
        };
        assert_eq!(
            deadline(&install, limits),
            Duration::from_secs(50 + 100 + 30)
        );
        let absurd = AgentCommand::Drain {
            timeout: Duration::from_secs(u64::MAX / 4),
        };
        assert_eq!(deadline(&absurd, limits), MAX_CALL);
    }
}
