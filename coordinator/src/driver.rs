//! The driver: the I/O shell around the pure engine. It feeds the engine events (agent step
//! results, readiness answers, operator commands, timers), writes every new state to the store
//! in one fenced transaction *before* carrying out the actions that state implies, and carries
//! them out: agent RPCs carrying the leader's epoch, readiness checks, failover hooks, waits.
//!
//! If the store says the leader is fenced, or an agent says the epoch is stale, the driver stops
//! at once: a newer leader owns the upgrade and will resume it from the store.

use crate::config::{PoolConfig, PoolSpec};
use crate::engine::{Action, DrainMode, Event, PoolState, Step, Upgrade};
use crate::inventory::Inventory;
use crate::readiness::{self, Clocks};
use crate::store::{Leadership, Store, StoreError, WriteOp};
use rollgate_common::time::now_ms;
use rollgate_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tonic::Code;

/// The store key of a pool's upgrade state.
pub fn upgrade_key(pool: &str) -> String {
    format!("upgrades/{pool}")
}

/// The store prefix of a pool's event history.
pub fn events_prefix(pool: &str) -> String {
    format!("events/{pool}/")
}

/// The store key of a pool's failover flag.
pub fn failover_key(pool: &str) -> String {
    format!("pools/{pool}/failover")
}

/// What is stored for a pool's upgrade: the engine state and the next event number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// The engine state.
    pub upgrade: Upgrade,
    /// The sequence number the next event record gets.
    pub next_event: u64,
}

/// One entry of the durable history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the pool's history.
    pub seq: u64,
    /// Wall-clock time (unix ms).
    pub at_ms: u64,
    /// The plan it belongs to.
    pub plan_id: String,
    /// The leader epoch that wrote it.
    pub epoch: u64,
    /// The coordinator that wrote it.
    pub coordinator: String,
    /// What happened (e.g. step_succeeded).
    pub kind: String,
    /// The server, if any.
    pub server: String,
    /// The domain, if any.
    pub domain: String,
    /// The detail.
    pub message: String,
}

/// Everything a driver needs that outlives one upgrade.
#[derive(Debug, Clone)]
pub struct Env {
    /// This coordinator's id.
    pub me: String,
    /// The store.
    pub store: Store,
    /// Agents' health and clients.
    pub inventory: Arc<Inventory>,
    /// Readiness clocks (lost_after, stabilisation).
    pub lost_after: Duration,
    /// See config.
    pub stabilization: Duration,
}

/// A command from the operator API to a running driver.
#[derive(Debug)]
pub struct Command {
    /// The engine event (Pause, Resume, Abort, Rollback).
    pub event: Event,
    /// Answered with the state after the event was applied (or an error).
    pub reply: oneshot::Sender<Result<Upgrade, String>>,
}

/// Why a driver stopped before its upgrade ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Leadership was lost (fenced write, stale epoch, lease lost).
    #[error("leadership lost: {0}")]
    LeadershipLost(String),
}

/// Writes one engine state plus its new event records in one fenced transaction, retrying
/// while the store is unavailable (the write is idempotent: same keys, same values).
pub async fn persist(
    env: &Env,
    lead: &Leadership,
    stored: &Stored,
    records: &[EventRecord],
) -> Result<(), DriveError> {
    let mut ops = Vec::with_capacity(records.len() + 1);
    let bytes = serde_json::to_vec(stored)
        .map_err(|e| DriveError::LeadershipLost(format!("cannot encode state: {e}")))?;
    ops.push(WriteOp::Put {
        key: upgrade_key(&stored.upgrade.plan.pool),
        value: bytes,
    });
    for r in records {
        let value = serde_json::to_vec(r)
            .map_err(|e| DriveError::LeadershipLost(format!("cannot encode event: {e}")))?;
        ops.push(WriteOp::Put {
            key: format!("{}{:012}", events_prefix(&stored.upgrade.plan.pool), r.seq),
            value,
        });
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        match env.store.fenced_write(lead, ops.clone()).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Fenced { epoch }) => {
                lead.lost.cancel();
                return Err(DriveError::LeadershipLost(format!(
                    "store fenced epoch {epoch}"
                )));
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "progress write failed; retrying");
                tokio::select! {
                    _ = lead.lost.cancelled() => return Err(DriveError::LeadershipLost("lease lost while retrying a write".into())),
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

/// Drives one pool's upgrade until it ends or leadership is lost.
pub struct Driver {
    env: Env,
    lead: Leadership,
    pool: PoolConfig,
    spec: PoolSpec,
    stored: Stored,
    status: watch::Sender<Option<Upgrade>>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    work: JoinSet<()>,
    /// The progress write under way, if any. Writes are pipelined one deep: a transition's
    /// actions start while its state is being written, but the next transition waits for that
    /// write. Safe because every step is named by a deterministic operation id that the agents
    /// journal: a new leader resuming from a state one transition old re-issues those ids and
    /// gets the stored answers back, so nothing runs twice.
    writing: Option<tokio::task::JoinHandle<Result<(), DriveError>>>,
}

impl Driver {
    /// A driver for `stored`, publishing its state on `status`.
    pub fn new(
        env: Env,
        lead: Leadership,
        pool: PoolConfig,
        stored: Stored,
        status: watch::Sender<Option<Upgrade>>,
    ) -> Driver {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let spec = pool.spec();
        status.send_replace(Some(stored.upgrade.clone()));
        Driver {
            env,
            lead,
            pool,
            spec,
            stored,
            status,
            events_tx,
            events_rx,
            work: JoinSet::new(),
            writing: None,
        }
    }

    /// Runs `initial` actions (from `Upgrade::new` or, with `resuming`, from `resume()` after
    /// reconciling with the agents' journals), then every event until the upgrade ends.
    pub async fn run(
        mut self,
        initial: Vec<Action>,
        resuming: bool,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<Upgrade, DriveError> {
        self.dispatch(initial, resuming).await?;
        loop {
            if self.stored.upgrade.is_terminal() && self.stored.upgrade.in_flight() == 0 {
                self.flush().await?;
                return Ok(self.stored.upgrade.clone());
            }
            tokio::select! {
                _ = self.lead.lost.cancelled() => return Err(DriveError::LeadershipLost("lease lost".into())),
                Some(ev) = self.events_rx.recv() => { self.apply(ev).await?; }
                Some(cmd) = commands.recv() => {
                    let r = self.apply(cmd.event).await;
                    let _ = cmd.reply.send(match &r {
                        Ok(()) => Ok(self.stored.upgrade.clone()),
                        Err(e) => Err(e.to_string()),
                    });
                    r?;
                }
                Some(_) = self.work.join_next(), if !self.work.is_empty() => {}
            }
        }
    }

    /// Waits for the progress write under way.
    async fn flush(&mut self) -> Result<(), DriveError> {
        match self.writing.take() {
            Some(h) => h
                .await
                .map_err(|e| DriveError::LeadershipLost(format!("progress writer failed: {e}")))?,
            None => Ok(()),
        }
    }

    async fn apply(&mut self, ev: Event) -> Result<(), DriveError> {
        let (next, actions) = self.stored.upgrade.clone().step(ev);
        self.stored.upgrade = next;
        self.dispatch(actions, false).await
    }

    /// Persists the current state with the actions' records, then carries out the rest.
    async fn dispatch(&mut self, actions: Vec<Action>, reconcile: bool) -> Result<(), DriveError> {
        let plan_id = self.stored.upgrade.plan.id.clone();
        let mut records = Vec::new();
        for a in &actions {
            if let Action::Record {
                kind,
                server,
                domain,
                message,
            } = a
            {
                records.push(EventRecord {
                    seq: self.stored.next_event,
                    at_ms: now_ms(),
                    plan_id: plan_id.clone(),
                    epoch: self.lead.epoch.get(),
                    coordinator: self.env.me.clone(),
                    kind: kind.clone(),
                    server: server.clone().unwrap_or_default(),
                    domain: domain.clone().unwrap_or_default(),
                    message: message.clone(),
                });
                self.stored.next_event += 1;
            }
        }
        self.flush().await?;
        let (env, lead, stored, recs) = (
            self.env.clone(),
            self.lead.clone(),
            self.stored.clone(),
            records.clone(),
        );
        self.writing = Some(tokio::spawn(async move {
            persist(&env, &lead, &stored, &recs).await
        }));
        self.status.send_replace(Some(self.stored.upgrade.clone()));
        for r in &records {
            tracing::info!(pool = %self.spec.name, kind = %r.kind, server = %r.server, domain = %r.domain, "{}", r.message);
        }
        for a in actions {
            match a {
                Action::Record { .. } => {}
                Action::Finished { status } => {
                    tracing::info!(pool = %self.spec.name, ?status, "upgrade finished")
                }
                Action::CheckReadiness { domain, after } => {
                    let (env, spec, tx, stop) = (
                        self.env.clone(),
                        self.spec.clone(),
                        self.events_tx.clone(),
                        self.lead.lost.clone(),
                    );
                    self.work.spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            ev = check_readiness(&env, &spec, &domain, after) => { let _ = tx.send(ev); }
                        }
                    });
                }
                Action::RunStep {
                    server,
                    step,
                    op_id,
                    attempt,
                } => {
                    let call = StepCall {
                        env: self.env.clone(),
                        lead: self.lead.clone(),
                        plan: self.stored.upgrade.plan.clone(),
                        server,
                        step,
                        op_id,
                        attempt,
                        reconcile,
                    };
                    let tx = self.events_tx.clone();
                    self.work.spawn(async move {
                        if let Some(ev) = call.run().await {
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
                    self.work.spawn(async move {
                        let (ok, message) =
                            run_failover(&env, &lead, &cfg, &pool, &paired, true, "upgrade").await;
                        let _ = tx.send(Event::FailoverDone { ok, message });
                    });
                }
                Action::Soak { after } => {
                    let (tx, stop) = (self.events_tx.clone(), self.lead.lost.clone());
                    self.work.spawn(async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(after) => { let _ = tx.send(Event::SoakDone); }
                        }
                    });
                }
            }
        }
        Ok(())
    }
}

/// Evaluates readiness for `domain` after `after`. Busy caused only by the stabilisation window
/// is waited out rather than answered, so that it never counts as one of the Busy answers.
pub async fn check_readiness(env: &Env, spec: &PoolSpec, domain: &str, after: Duration) -> Event {
    tokio::time::sleep(after).await;
    // InsufficientActiveFrontEnds triggers failover or a pause at once, so it is confirmed
    // first: a new leader's inventory, or a health stream that is reconnecting, can briefly
    // show servers as lost that are in fact serving.
    // The window outlasts a short partition between this leader and the agents: what the
    // leader cannot see is unknown, not absent.
    let confirm_until = tokio::time::Instant::now() + env.lost_after * 2 + Duration::from_secs(10);
    loop {
        let stale: Vec<String> = {
            let snap = env.inventory.snapshot();
            spec.servers()
                .filter(|s| {
                    snap.get(*s)
                        .is_none_or(|h| h.state != "serving" || !h.accepting)
                })
                .cloned()
                .collect()
        };
        env.inventory.refresh_all(stale).await;
        let r = evaluate(env, spec, false);
        if r.state == PoolState::Busy && r.busy_only_stabilising {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if r.state == PoolState::InsufficientActiveFrontEnds
            && tokio::time::Instant::now() < confirm_until
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
            env.inventory.refresh_all(spec.servers().cloned()).await;
            continue;
        }
        let domain_ready = r.domain(domain).is_some_and(|d| d.ready_for_upgrade);
        let reason = match r.domain(domain) {
            Some(d) if r.state == PoolState::Ready => {
                format!("{}; {}: {}", r.reason, domain, d.reason)
            }
            _ => r.reason.clone(),
        };
        return Event::Readiness {
            state: r.state,
            domain_ready,
            reason,
        };
    }
}

/// Readiness of a pool now.
pub fn evaluate(env: &Env, spec: &PoolSpec, operation_running: bool) -> readiness::PoolReadiness {
    let clocks = Clocks {
        now_ms: env.inventory.now_ms(),
        lost_after_ms: u64::try_from(env.lost_after.as_millis()).unwrap_or(u64::MAX),
        stabilization_ms: u64::try_from(env.stabilization.as_millis()).unwrap_or(u64::MAX),
    };
    readiness::evaluate(spec, &env.inventory.snapshot(), clocks, operation_running)
}

/// Runs the failover (or failback) hook and records the pool's state durably.
pub async fn run_failover(
    env: &Env,
    lead: &Leadership,
    cfg: &PoolConfig,
    pool: &str,
    paired: &str,
    over: bool,
    by: &str,
) -> (bool, String) {
    let argv = if over { &cfg.failover } else { &cfg.failback };
    let what = if over { "failover" } else { "failback" };
    if argv.is_empty() {
        return (
            false,
            format!("pool {pool} has no {what} command configured"),
        );
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("ROLLGATE_POOL", pool)
        .env("ROLLGATE_PAIRED_POOL", paired)
        .kill_on_drop(true);
    let out = match tokio::time::timeout(cfg.hook_timeout, cmd.output()).await {
        Err(_) => {
            return (
                false,
                format!(
                    "{what} command timed out after {}s",
                    cfg.hook_timeout.as_secs()
                ),
            )
        }
        Ok(Err(e)) => return (false, format!("{what} command could not run: {e}")),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        let tail = String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        return (
            false,
            format!(
                "{what} command exited with {}: {tail}",
                out.status.code().unwrap_or(-1)
            ),
        );
    }
    let flag = serde_json::json!({ "failed_over": over, "paired_pool": paired, "at_ms": now_ms(), "by": by });
    if let Err(e) = env
        .store
        .fenced_write(
            lead,
            vec![WriteOp::Put {
                key: failover_key(pool),
                value: flag.to_string().into_bytes(),
            }],
        )
        .await
    {
        return (false, format!("{what} ran but could not be recorded: {e}"));
    }
    let msg = if over {
        format!("pool {pool} failed over to {paired}")
    } else {
        format!("pool {pool} failed back from {paired}")
    };
    (true, msg)
}

struct StepCall {
    env: Env,
    lead: Leadership,
    plan: crate::engine::Plan,
    server: String,
    step: Step,
    op_id: String,
    attempt: u32,
    reconcile: bool,
}

impl StepCall {
    fn done(&self, ok: bool, message: String) -> Event {
        Event::StepDone {
            server: self.server.clone(),
            step: self.step,
            attempt: self.attempt,
            ok,
            message,
        }
    }

    fn header(&self) -> Option<pb::OperationHeader> {
        Some(pb::OperationHeader {
            operation_id: self.op_id.clone(),
            epoch: self.lead.epoch.get(),
        })
    }

    /// How long the agent may take for this step, plus slack for the network.
    fn deadline(&self) -> Duration {
        let p = &self.plan;
        let step = match self.step {
            Step::Drain => match p.drain {
                DrainMode::Graceful { timeout } => timeout,
                DrainMode::Immediate => Duration::from_secs(60),
            },
            Step::Verify => p.verify_timeout,
            _ => Duration::from_secs(600),
        };
        step + Duration::from_secs(30)
    }

    /// Calls the agent; `None` when leadership was lost (nothing to report).
    async fn run(self) -> Option<Event> {
        let Some(mut client) = self.env.inventory.client(&self.server) else {
            return Some(self.done(
                false,
                format!("server {} has no agent address", self.server),
            ));
        };
        if self.reconcile {
            // A new leader reads the agent's journal before acting, instead of re-issuing blindly.
            match client
                .operation_status(pb::OperationStatusRequest {
                    operation_id: self.op_id.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    match pb::OperationState::try_from(r.state) {
                        Ok(pb::OperationState::Succeeded) => {
                            return Some(
                                self.done(
                                    true,
                                    format!("(from the agent's journal) {}", r.message),
                                ),
                            )
                        }
                        Ok(pb::OperationState::Failed) => {
                            return Some(
                                self.done(
                                    false,
                                    format!("(from the agent's journal) {}", r.message),
                                ),
                            )
                        }
                        _ => {} // running or interrupted: re-issuing the same id attaches or reruns
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(server = %self.server, op = %self.op_id, error = %s.message(), "cannot read the agent's journal; issuing the step")
                }
            }
        }
        let give_up = tokio::time::Instant::now() + self.deadline();
        let mut backoff = Duration::from_millis(100);
        loop {
            let res = tokio::select! {
                _ = self.lead.lost.cancelled() => return None,
                r = self.call(&mut client) => r,
            };
            match res {
                Ok(r) => {
                    let ok = r.state == pb::OperationState::Succeeded as i32;
                    return Some(self.done(ok, r.message));
                }
                Err(s)
                    if s.code() == Code::FailedPrecondition
                        && s.message().starts_with("stale epoch") =>
                {
                    tracing::warn!(server = %self.server, error = %s.message(), "an agent has seen a newer leader: stepping down");
                    self.lead.lost.cancel();
                    return None;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::DeadlineExceeded
                            | Code::Aborted
                            | Code::Cancelled
                    ) && tokio::time::Instant::now() < give_up =>
                {
                    // The same operation id again: the agent's journal makes this safe.
                    tracing::debug!(server = %self.server, op = %self.op_id, error = %s.message(), "agent call failed; retrying the same operation");
                    tokio::select! {
                        _ = self.lead.lost.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(s) => {
                    return Some(self.done(
                        false,
                        format!("{} call refused: {}", self.step.name(), s.message()),
                    ))
                }
            }
        }
    }

    async fn call(
        &self,
        c: &mut rollgate_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>,
    ) -> Result<pb::OperationResult, tonic::Status> {
        let p = &self.plan;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let h = self.header();
        let limit = self.deadline();
        let r = match self.step {
            Step::Drain => {
                let timeout_ms = match p.drain {
                    DrainMode::Graceful { timeout } => ms(timeout),
                    DrainMode::Immediate => 0,
                };
                c.drain(with_deadline(
                    limit,
                    pb::DrainRequest {
                        header: h,
                        timeout_ms,
                        on_timeout: pb::DrainTimeoutAction::Fail as i32,
                    },
                ))
                .await?
            }
            Step::Stop => {
                c.stop(with_deadline(limit, pb::StopRequest { header: h }))
                    .await?
            }
            Step::Install => {
                c.install_patch(with_deadline(
                    limit,
                    pb::InstallPatchRequest {
                        header: h,
                        artifact: p.artifact.clone(),
                        sha256: p.sha256.clone(),
                        version: p.version.clone(),
                        timeout_ms: 0,
                        ..Default::default()
                    },
                ))
                .await?
            }
            Step::Rollback => {
                c.rollback(with_deadline(
                    limit,
                    pb::RollbackRequest {
                        header: h,
                        timeout_ms: 0,
                        from_version: p.version.clone(),
                        ..Default::default()
                    },
                ))
                .await?
            }
            Step::Restart => {
                c.restart(with_deadline(
                    limit,
                    pb::RestartRequest {
                        header: h,
                        timeout_ms: 0,
                        ..Default::default()
                    },
                ))
                .await?
            }
            Step::Verify => {
                c.verify(with_deadline(
                    limit,
                    pb::VerifyRequest {
                        header: h,
                        stable_ms: ms(p.verify_stable),
                        timeout_ms: ms(p.verify_timeout),
                    },
                ))
                .await?
            }
        };
        Ok(r.into_inner())
    }
}

/// A request with a gRPC deadline, so that a hung agent cannot hold a step forever.
fn with_deadline<T>(limit: Duration, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(limit);
    r
}
