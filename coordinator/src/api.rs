//! The operator gRPC API: checks the operator role, converts wire types to the control layer's
//! domain types and back, and maps [`ControlError`] to `tonic::Status` in one place
//! ([`to_status`]). No logic lives here.

use crate::control::{
    Control, ControlError, DrainKind, RolloutRequest, StartRequest, UpgradeCommand, Watched,
    WatchedRollout,
};
use crate::engine::{
    Direction, DomainPhase, ExhaustedAction, FailureAction, PoolState, RollbackArtifact,
    ServerPhase, Status as UpStatus, Step, Upgrade,
};
use crate::progress::EventRecord;
use crate::readiness::{PoolReadiness, ServerState};
use crate::rollout::{Rollout, Stage};
use rollgate_common::tls::{authorize, Caller, RoleKind};
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::{LEADER_HEADER, RETRY_AFTER_HEADER};
use std::pin::Pin;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long a client should wait before retrying a coordinator that is taking over.
const RETRY_AFTER_MS: &str = "200";

/// Maps every control error to a gRPC status: FAILED_PRECONDITION with the leader's address
/// for a follower, UNAVAILABLE with a retry hint while taking over.
pub fn to_status(e: ControlError) -> Status {
    let msg = e.to_string();
    match e {
        ControlError::Invalid(_) => Status::invalid_argument(msg),
        ControlError::UnknownPool(_) | ControlError::NoUpgrade(_) => Status::not_found(msg),
        ControlError::NotLeader { leader } => {
            let mut s = if leader.is_some() {
                Status::failed_precondition(msg)
            } else {
                Status::unavailable(msg)
            };
            if let Some(a) = leader.and_then(|l| l.address.parse().ok()) {
                s.metadata_mut().insert(LEADER_HEADER, a);
            }
            s
        }
        ControlError::TakingOver { .. } => {
            let mut s = Status::unavailable(msg);
            s.metadata_mut().insert(
                RETRY_AFTER_HEADER,
                tonic::metadata::MetadataValue::from_static(RETRY_AFTER_MS),
            );
            s
        }
        ControlError::AlreadyRunning { .. } | ControlError::RolloutRunning(_) => {
            Status::already_exists(msg)
        }
        ControlError::PairedBusy { .. } | ControlError::PairedFailedOver { .. } => {
            Status::failed_precondition(msg)
        }
        ControlError::NoRollout(_) => Status::not_found(msg),
        ControlError::StoreRefused(_) => Status::resource_exhausted(msg),
        ControlError::Store { .. } | ControlError::LeadershipLost(_) => Status::unavailable(msg),
        ControlError::Hook(_) => Status::aborted(msg),
    }
}

/// The `rollgate.operator.v1.Membership` service: agents joining their pool by themselves.
#[derive(Debug, Clone)]
pub struct MembershipApi {
    control: Control,
}

impl MembershipApi {
    /// Serves `control`.
    pub fn new(control: Control) -> Self {
        MembershipApi { control }
    }

    /// The server the caller's certificate names; joining needs one (no insecure mode).
    #[allow(clippy::result_large_err)]
    fn server<T>(req: &Request<T>) -> Result<String, Status> {
        match authorize(req, false, &[RoleKind::Agent])? {
            Caller::Authenticated(role) => Ok(role.name),
            Caller::Insecure => Err(Status::unauthenticated(
                "joining needs mutual TLS: the agent's certificate names the server",
            )),
        }
    }
}

#[tonic::async_trait]
impl pb::membership_server::Membership for MembershipApi {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let server = Self::server(&req)?;
        let r = req.into_inner();
        let domain = Some(r.upgrade_domain).filter(|d| !d.is_empty());
        let changed = self
            .control
            .join(&server, &r.pool, domain, &r.address)
            .await
            .map_err(to_status)?;
        let message = if changed {
            format!("{server} joined pool {}", r.pool)
        } else {
            format!("{server} is already in pool {} as asked", r.pool)
        };
        Ok(Response::new(pb::JoinResponse { changed, message }))
    }

    async fn leave(
        &self,
        req: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let server = Self::server(&req)?;
        let changed = self.control.leave(&server).await.map_err(to_status)?;
        let message = if changed {
            format!("{server} left its pool")
        } else {
            format!("{server} had not joined a pool")
        };
        Ok(Response::new(pb::JoinResponse { changed, message }))
    }
}

/// The `rollgate.operator.v1.Operator` service.
#[derive(Debug, Clone)]
pub struct OperatorApi {
    control: Control,
    insecure: bool,
}

impl OperatorApi {
    /// Serves `control`; `insecure` turns role checks off (only with TLS off).
    pub fn new(control: Control, insecure: bool) -> Self {
        OperatorApi { control, insecure }
    }

    /// Checks the operator role; returns who is calling, for the event history.
    #[allow(clippy::result_large_err)]
    fn allow<T>(&self, req: &Request<T>) -> Result<String, Status> {
        Ok(
            match authorize(req, self.insecure, &[RoleKind::Operator])? {
                Caller::Authenticated(role) => role.to_string(),
                Caller::Insecure => "operator (insecure mode)".to_owned(),
            },
        )
    }

    fn status(&self, u: Option<&Upgrade>, pool: &str, dry_run: bool) -> pb::UpgradeStatus {
        let lead = self.control.node().leadership();
        let held = match (&lead, self.control.node().driver(pool)) {
            (Some(_), Some(h)) => crate::driver::lock_held(&h.held).clone(),
            _ => None,
        };
        let mut s = status_of(
            u,
            pool,
            dry_run,
            lead.as_ref().map_or(0, |l| l.epoch.get()),
            if lead.is_some() {
                self.control.node().cfg.id.clone()
            } else {
                String::new()
            },
        );
        s.held = held.unwrap_or_default();
        s
    }

    fn rollout_status(&self, r: &Rollout, dry_run: bool) -> pb::RolloutStatus {
        let lead = self.control.node().leadership();
        let mut s = rollout_of(r, dry_run);
        if let Some(l) = lead {
            s.epoch = l.epoch.get();
            s.leader = self.control.node().cfg.id.clone();
        }
        s
    }

    async fn rollout_command(
        &self,
        req: Request<pb::RolloutRequest>,
        cmd: UpgradeCommand,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let by = self.allow(&req)?;
        let id = req.into_inner().id;
        let id = Some(id.as_str()).filter(|i| !i.is_empty());
        let r = self
            .control
            .rollout_command(id, cmd, &by)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.rollout_status(&r, false)))
    }

    async fn command(
        &self,
        req: Request<pb::PoolRequest>,
        cmd: UpgradeCommand,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        let pool = req.into_inner().pool;
        let u = self
            .control
            .command(&pool, cmd, &by)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.status(Some(&u), &pool, false)))
    }
}

fn ms(v: Option<u64>) -> Option<Duration> {
    v.map(Duration::from_millis)
}

/// A wire start request in domain terms. Unset optional fields stay unset: the control layer
/// resolves defaults; an explicit zero is kept.
pub fn start_request(r: pb::StartUpgradeRequest) -> Result<StartRequest, ControlError> {
    let drain = match pb::DrainMode::try_from(r.drain) {
        Ok(pb::DrainMode::Unspecified) => None,
        Ok(pb::DrainMode::Graceful) => Some(DrainKind::Graceful),
        Ok(pb::DrainMode::Immediate) => Some(DrainKind::Immediate),
        Err(_) => {
            return Err(ControlError::Invalid(format!(
                "drain: unknown mode {}",
                r.drain
            )))
        }
    };
    let on_exhausted = match pb::ExhaustedAction::try_from(r.on_exhausted) {
        Ok(pb::ExhaustedAction::Unspecified) => None,
        Ok(pb::ExhaustedAction::Failover) => Some(ExhaustedAction::Failover),
        Ok(pb::ExhaustedAction::Pause) => Some(ExhaustedAction::Pause),
        Ok(pb::ExhaustedAction::Abort) => Some(ExhaustedAction::Abort),
        Err(_) => {
            return Err(ControlError::Invalid(format!(
                "on_exhausted: unknown action {}",
                r.on_exhausted
            )))
        }
    };
    let on_failure = match pb::FailureAction::try_from(r.on_failure) {
        Ok(pb::FailureAction::Unspecified) => None,
        Ok(pb::FailureAction::Pause) => Some(FailureAction::Pause),
        Ok(pb::FailureAction::Rollback) => Some(FailureAction::Rollback),
        Err(_) => {
            return Err(ControlError::Invalid(format!(
                "on_failure: unknown action {}",
                r.on_failure
            )))
        }
    };
    let rollback_artifact = match (r.rollback_artifact.is_empty(), r.rollback_sha256.is_empty()) {
        (true, true) => None,
        (false, false) => Some(RollbackArtifact {
            artifact: r.rollback_artifact,
            sha256: r.rollback_sha256,
        }),
        _ => {
            return Err(ControlError::Invalid(
                "rollback_artifact and rollback_sha256 go together: give both or neither".into(),
            ))
        }
    };
    Ok(StartRequest {
        pool: r.pool,
        version: r.version,
        artifact: r.artifact,
        sha256: r.sha256,
        drain,
        drain_timeout: ms(r.drain_timeout_ms),
        parallelism: r.parallelism,
        verify_stable: ms(r.verify_stable_ms),
        verify_timeout: ms(r.verify_timeout_ms),
        busy_retry_interval: ms(r.busy_retry_interval_ms),
        busy_retries: r.busy_retries,
        on_exhausted,
        server_retries: r.server_retries,
        on_failure,
        domain_order: r.domain_order,
        canary_soak: ms(r.canary_soak_ms),
        rollback_artifact,
        dry_run: r.dry_run,
        plan_id: None,
    })
}

/// A wire roll-out request in domain terms.
pub fn rollout_request(r: pb::StartRolloutRequest) -> Result<RolloutRequest, ControlError> {
    let mut template = start_request(r.upgrade.unwrap_or_default())?;
    template.dry_run = false;
    Ok(RolloutRequest {
        pools: r.pools,
        selector: r.selector,
        canary: Some(r.canary).filter(|c| !c.is_empty()),
        max_in_flight: r.max_in_flight,
        template,
        dry_run: r.dry_run,
    })
}

/// A roll-out on the wire (without the leader's epoch and id).
pub fn rollout_of(r: &Rollout, dry_run: bool) -> pb::RolloutStatus {
    let pools = r
        .plan
        .pools
        .iter()
        .filter_map(|name| {
            let p = r.pools.get(name)?;
            let reason = match &p.stage {
                Stage::Failed { reason } | Stage::Skipped { reason } => reason.clone(),
                _ => String::new(),
            };
            Some(pb::RolloutPool {
                pool: name.clone(),
                stage: p.stage.name().to_owned(),
                plan_id: r.plan.plan_id(name),
                reason,
                waiting: p.waiting.clone().unwrap_or_default(),
                started_ms: p.started_ms.unwrap_or(0),
                ended_ms: p.ended_ms.unwrap_or(0),
                paired_pool: r.plan.paired.get(name).cloned().unwrap_or_default(),
            })
        })
        .collect();
    pb::RolloutStatus {
        id: r.plan.id.clone(),
        state: r.status.name().to_owned(),
        reason: r.status.reason().to_owned(),
        version: r.plan.template.version.clone(),
        pools,
        max_in_flight: r.plan.max_in_flight,
        canary: r.plan.canary.clone().unwrap_or_default(),
        ended: r.is_ended(),
        started_by: r.plan.started_by.clone(),
        started_ms: r.plan.started_ms,
        epoch: 0,
        leader: String::new(),
        dry_run,
    }
}

fn direction(d: Direction) -> pb::Direction {
    match d {
        Direction::Forward => pb::Direction::Forward,
        Direction::Backward => pb::Direction::Backward,
        Direction::Restore => pb::Direction::Restore,
    }
}

fn step(s: Step) -> pb::Step {
    match s {
        Step::Prepare => pb::Step::Prepare,
        Step::Drain => pb::Step::Drain,
        Step::Stop => pb::Step::Stop,
        Step::Install => pb::Step::Install,
        Step::Rollback => pb::Step::Rollback,
        Step::Restart => pb::Step::Restart,
        Step::Verify => pb::Step::Verify,
    }
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An upgrade on the wire.
pub fn status_of(
    u: Option<&Upgrade>,
    pool: &str,
    dry_run: bool,
    epoch: u64,
    leader: String,
) -> pb::UpgradeStatus {
    let mut s = pb::UpgradeStatus {
        pool: pool.to_owned(),
        status: pb::UpgradeState::None as i32,
        epoch,
        leader,
        dry_run,
        ..Default::default()
    };
    let Some(u) = u else { return s };
    s.status = match &u.status {
        UpStatus::Running => pb::UpgradeState::Running,
        UpStatus::Paused { .. } => pb::UpgradeState::Paused,
        UpStatus::Completed => pb::UpgradeState::Completed,
        UpStatus::Aborted { .. } => pb::UpgradeState::Aborted,
        UpStatus::Failed { .. } => pb::UpgradeState::Failed,
        UpStatus::RollingBack { .. } => pb::UpgradeState::RollingBack,
        UpStatus::RolledBack => pb::UpgradeState::RolledBack,
    } as i32;
    s.reason = u.status.reason().unwrap_or_default().to_string();
    s.plan_id = u.plan.id.clone();
    s.version = u.plan.version.clone();
    s.direction = direction(u.direction) as i32;
    s.current_domain = u.current_domain().unwrap_or_default().to_string();
    s.domain_phase = match u.domain_phase {
        DomainPhase::FailingOver => pb::DomainPhase::FailingOver,
        DomainPhase::Soaking => pb::DomainPhase::Soaking,
        DomainPhase::AwaitingWindow => pb::DomainPhase::AwaitingWindow,
        DomainPhase::InProgress if u.waiting_ready() => pb::DomainPhase::WaitingReady,
        DomainPhase::InProgress => pb::DomainPhase::InProgress,
    } as i32;
    s.domain_index = u32_of(u.domain_index);
    s.domains_total = u32_of(u.plan.domains.len());
    s.failed_over = u.failed_over;
    s.ended = u.is_terminal();
    s.plan_json = serde_json::to_string_pretty(&u.plan).unwrap_or_default();
    for d in &u.plan.domains {
        for server in &d.servers {
            let Some(p) = u.servers.get(server) else {
                continue;
            };
            let (phase, st, attempt, message) = match &p.phase {
                ServerPhase::Pending => (pb::ServerPhase::Pending, None, 0, String::new()),
                ServerPhase::InFlight { step, attempt } => (
                    pb::ServerPhase::InFlight,
                    Some(*step),
                    *attempt,
                    String::new(),
                ),
                ServerPhase::Prepared => (pb::ServerPhase::Prepared, None, 0, String::new()),
                ServerPhase::Unanswered {
                    step,
                    attempt,
                    message,
                } => (
                    pb::ServerPhase::Unanswered,
                    Some(*step),
                    *attempt,
                    message.clone(),
                ),
                ServerPhase::Done => (pb::ServerPhase::Done, None, 0, String::new()),
                ServerPhase::Failed { step, message } => {
                    (pb::ServerPhase::Failed, Some(*step), 0, message.clone())
                }
            };
            s.servers.push(pb::ServerProgress {
                server: server.clone(),
                domain: d.name.clone(),
                phase: phase as i32,
                step: st.map_or(pb::Step::Unspecified, step) as i32,
                attempt,
                message,
                direction: direction(p.direction) as i32,
            });
        }
    }
    s.out_of_service = u
        .out_of_service()
        .into_iter()
        .map(|(server, reason)| pb::OutOfService { server, reason })
        .collect();
    s
}

fn server_state(s: ServerState) -> pb::ServerState {
    match s {
        ServerState::Serving => pb::ServerState::Serving,
        ServerState::Draining => pb::ServerState::Draining,
        ServerState::Drained => pb::ServerState::Drained,
        ServerState::Stopped => pb::ServerState::Stopped,
        ServerState::Installing => pb::ServerState::Installing,
        ServerState::Starting => pb::ServerState::Starting,
        ServerState::Failed => pb::ServerState::Failed,
        ServerState::Lost => pb::ServerState::Lost,
        ServerState::Unknown => pb::ServerState::Unknown,
    }
}

/// A pool's readiness on the wire.
pub fn readiness_of(r: &PoolReadiness, failed_over: bool) -> pb::PoolReadiness {
    pb::PoolReadiness {
        pool: r.pool.clone(),
        state: match r.state {
            PoolState::Ready => pb::ReadinessState::Ready,
            PoolState::Busy => pb::ReadinessState::Busy,
            PoolState::InsufficientActiveFrontEnds => {
                pb::ReadinessState::InsufficientActiveFrontEnds
            }
        } as i32,
        reason: r.reason.clone(),
        min_active: u32_of(r.min_active),
        active: u32_of(r.active),
        total: u32_of(r.total),
        failed_over,
        domains: r
            .domains
            .iter()
            .map(|d| pb::DomainReadiness {
                name: d.name.clone(),
                ready_for_upgrade: d.ready_for_upgrade,
                reason: d.reason.clone(),
                servers: d
                    .servers
                    .iter()
                    .map(|s| pb::ServerReadiness {
                        server: s.server.clone(),
                        state: server_state(s.state) as i32,
                        version: s.version.clone(),
                        active: s.active,
                        busy: s.busy,
                        healthy: s.healthy,
                        detail: s.detail.clone(),
                        active_connections: s.active_connections,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// An event on the wire.
pub fn event_of(e: EventRecord) -> pb::Event {
    pb::Event {
        seq: e.seq,
        at_ms: e.at_ms,
        plan_id: e.plan_id,
        epoch: e.epoch,
        coordinator: e.coordinator,
        kind: e.kind,
        server: e.server,
        domain: e.domain,
        message: e.message,
    }
}

type StatusStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::UpgradeStatus, Status>> + Send>>;
type RolloutStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorApi {
    async fn readiness(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolReadiness>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        let (r, failed_over) = self.control.readiness(&pool).await.map_err(to_status)?;
        Ok(Response::new(readiness_of(&r, failed_over)))
    }

    async fn inventory(
        &self,
        req: Request<pb::InventoryRequest>,
    ) -> Result<Response<pb::InventoryResponse>, Status> {
        self.allow(&req)?;
        let pools = self.control.inventory().await.map_err(to_status)?;
        Ok(Response::new(pb::InventoryResponse {
            pools: pools.iter().map(|(r, f)| readiness_of(r, *f)).collect(),
        }))
    }

    async fn start_upgrade(
        &self,
        req: Request<pb::StartUpgradeRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        let r = start_request(req.into_inner()).map_err(to_status)?;
        let (pool, dry_run) = (r.pool.clone(), r.dry_run);
        let u = self.control.start(r, &by).await.map_err(to_status)?;
        Ok(Response::new(self.status(Some(&u), &pool, dry_run)))
    }

    async fn get_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        let u = match self.control.upgrade(&pool).await {
            Ok(u) => u,
            Err(e) => {
                // A leader that found the record unreadable says so rather than "store".
                if let Some(why) = self.control.unreadable(&pool) {
                    return Err(Status::data_loss(format!(
                        "the stored upgrade of pool {pool} is unreadable ({why}); start a new \
                         upgrade to replace it"
                    )));
                }
                return Err(to_status(e));
            }
        };
        Ok(Response::new(self.status(u.as_ref(), &pool, false)))
    }

    type WatchUpgradeStream = StatusStream;

    async fn watch_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<Self::WatchUpgradeStream>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        let rx = match self.control.watch(&pool).await.map_err(to_status)? {
            Watched::Live(rx) => rx,
            Watched::Once(u) => {
                let s = self.status(u.as_ref().as_ref(), &pool, false);
                return Ok(Response::new(Box::pin(futures_util::stream::iter([Ok(s)]))));
            }
        };
        let me = self.clone();
        let stream = futures_util::stream::unfold(
            (rx, me, pool, false, true),
            |(mut rx, me, pool, ended, first)| async move {
                if ended {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let u = rx.borrow_and_update().clone();
                let done = u.as_ref().is_none_or(Upgrade::is_terminal);
                let s = me.status(u.as_ref(), &pool, false);
                Some((Ok(s), (rx, me, pool, done, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn start_rollout(
        &self,
        req: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let by = self.allow(&req)?;
        let r = rollout_request(req.into_inner()).map_err(to_status)?;
        let dry_run = r.dry_run;
        let out = self
            .control
            .start_rollout(r, &by)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.rollout_status(&out, dry_run)))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.allow(&req)?;
        let id = req.into_inner().id;
        let id = Some(id.as_str()).filter(|i| !i.is_empty());
        match self.control.rollout(id).await.map_err(to_status)? {
            Some(r) => Ok(Response::new(self.rollout_status(&r, false))),
            None => Err(to_status(ControlError::NoRollout(
                id.unwrap_or("").to_owned(),
            ))),
        }
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.allow(&req)?;
        let id = req.into_inner().id;
        let id = Some(id.as_str()).filter(|i| !i.is_empty());
        let rx = match self.control.watch_rollout(id).await.map_err(to_status)? {
            WatchedRollout::Live(rx) => rx,
            WatchedRollout::Once(r) => {
                let r = (*r).ok_or_else(|| {
                    to_status(ControlError::NoRollout(id.unwrap_or("").to_owned()))
                })?;
                let s = self.rollout_status(&r, false);
                return Ok(Response::new(Box::pin(futures_util::stream::iter([Ok(s)]))));
            }
        };
        let me = self.clone();
        let stream = futures_util::stream::unfold(
            (rx, me, false, true),
            |(mut rx, me, ended, first)| async move {
                if ended {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let r = rx.borrow_and_update().clone();
                let s = me.rollout_status(&r, false);
                Some((Ok(s), (rx, me, r.is_ended(), false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pause_rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.rollout_command(req, UpgradeCommand::Pause).await
    }

    async fn resume_rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.rollout_command(req, UpgradeCommand::Resume).await
    }

    async fn abort_rollout(
        &self,
        req: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        self.rollout_command(req, UpgradeCommand::Abort).await
    }

    async fn pause_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.command(req, UpgradeCommand::Pause).await
    }

    async fn resume_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.command(req, UpgradeCommand::Resume).await
    }

    async fn abort_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.command(req, UpgradeCommand::Abort).await
    }

    async fn rollback_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.command(req, UpgradeCommand::Rollback).await
    }

    async fn failover(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolActionResponse>, Status> {
        let by = self.allow(&req)?;
        let pool = req.into_inner().pool;
        let message = self
            .control
            .failover(&pool, true, &by)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PoolActionResponse {
            pool,
            message,
            failed_over: true,
        }))
    }

    async fn failback(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolActionResponse>, Status> {
        let by = self.allow(&req)?;
        let pool = req.into_inner().pool;
        let message = self
            .control
            .failover(&pool, false, &by)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PoolActionResponse {
            pool,
            message,
            failed_over: false,
        }))
    }

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<pb::EventsResponse>, Status> {
        self.allow(&req)?;
        let r = req.into_inner();
        let range = crate::progress::EventRange {
            after: r.after_seq,
            before: r.before_seq,
            limit: usize::try_from(r.limit).unwrap_or(usize::MAX),
        };
        let page = self
            .control
            .events(&r.pool, range)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::EventsResponse {
            events: page.events.into_iter().map(event_of).collect(),
            more: page.more,
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.allow(&req)?;
        let r = req.into_inner();
        let plans = self
            .control
            .history(&r.pool, r.limit)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::HistoryResponse {
            plans: plans
                .into_iter()
                .map(|h| pb::PastPlan {
                    plan_id: h.plan_id,
                    version: h.version,
                    started_by: h.started_by,
                    started_ms: h.started_ms,
                    ended_ms: h.ended_ms,
                    outcome: h.outcome,
                    reason: h.reason,
                    servers: h.servers,
                })
                .collect(),
        }))
    }

    async fn leader(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.allow(&req)?;
        let v = self.control.leader().await.map_err(to_status)?;
        Ok(Response::new(match v.leader {
            Some(l) => pb::LeaderResponse {
                this_is_leader: v.this_is_leader,
                id: l.id,
                address: l.address,
                epoch: l.epoch.get(),
                this_id: v.this_id,
            },
            None => pb::LeaderResponse {
                this_id: v.this_id,
                ..Default::default()
            },
        }))
    }
}
