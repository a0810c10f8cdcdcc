//! The operator API: converts wire types to domain types, checks the operator role, sends
//! state-changing calls to the leader's drivers, and maps errors to `tonic::Status` in one place.

use crate::driver::{self, events_prefix, failover_key, upgrade_key, Command, EventRecord, Stored};
use crate::engine::{
    Direction, DomainPhase, DrainMode, Event, ExhaustedAction, FailureAction, Plan, ServerPhase,
    Status as UpStatus, Upgrade,
};
use crate::node::Node;
use crate::readiness::PoolReadiness;
use rollgate_common::tls::{authorize, Caller, RoleKind};
use rollgate_proto::operator::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// The metadata key a follower puts the leader's address in.
pub const LEADER_HEADER: &str = "rollgate-leader";

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The pool is not configured.
    #[error("unknown pool {0:?}")]
    UnknownPool(String),
    /// This node does not lead; the leader is elsewhere (or unknown).
    #[error("this coordinator is not the leader; {0}")]
    NotLeader(String, Option<String>),
    /// An upgrade is already running on the pool.
    #[error("an upgrade ({0}) is already running on pool {1}; pause, abort or wait for it")]
    AlreadyRunning(String, String),
    /// There is no upgrade to act on.
    #[error("no upgrade is running on pool {0}")]
    NoUpgrade(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// Leadership was lost while handling the call.
    #[error("leadership lost while handling the call: {0}")]
    Lost(String),
    /// A failover/failback hook failed.
    #[error("{0}")]
    Hook(String),
}

fn to_status(e: ApiError) -> Status {
    let msg = e.to_string();
    match e {
        ApiError::Invalid(_) => Status::invalid_argument(msg),
        ApiError::UnknownPool(_) | ApiError::NoUpgrade(_) => Status::not_found(msg),
        ApiError::NotLeader(_, addr) => {
            let mut s = Status::failed_precondition(msg);
            if let Some(a) = addr.and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert(LEADER_HEADER, a);
            }
            s
        }
        ApiError::AlreadyRunning(..) => Status::already_exists(msg),
        ApiError::Store(_) | ApiError::Lost(_) => Status::unavailable(msg),
        ApiError::Hook(_) => Status::aborted(msg),
    }
}

/// The `rollgate.operator.v1.Operator` service.
#[derive(Debug, Clone)]
pub struct OperatorApi {
    node: Arc<Node>,
}

impl OperatorApi {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        OperatorApi { node }
    }

    /// Checks the operator role; returns who is calling, for the event history.
    #[allow(clippy::result_large_err)]
    fn allow<T>(&self, req: &Request<T>) -> Result<String, Status> {
        Ok(
            match authorize(req, self.node.cfg.insecure, &[RoleKind::Operator])? {
                Caller::Authenticated(role) => role.to_string(),
                Caller::Insecure => "operator (insecure mode)".to_owned(),
            },
        )
    }

    async fn not_leader(&self) -> ApiError {
        match self.node.env.store.leader().await {
            Ok(Some(l)) => ApiError::NotLeader(
                format!(
                    "the leader is {} at {} (epoch {})",
                    l.id, l.address, l.epoch
                ),
                Some(l.address),
            ),
            Ok(None) => {
                ApiError::NotLeader("no leader is elected right now; retry shortly".into(), None)
            }
            Err(e) => ApiError::NotLeader(format!("and the leader cannot be read: {e}"), None),
        }
    }

    fn pool(&self, name: &str) -> Result<&crate::config::PoolConfig, ApiError> {
        if name.is_empty() {
            return Err(ApiError::Invalid("pool: a pool name is required".into()));
        }
        self.node
            .cfg
            .pool(name)
            .ok_or_else(|| ApiError::UnknownPool(name.into()))
    }

    async fn stored(&self, pool: &str) -> Result<Option<Stored>, ApiError> {
        match self.node.env.store.get(&upgrade_key(pool)).await {
            Ok(Some(kv)) => serde_json::from_slice(&kv.value)
                .map(Some)
                .map_err(|e| ApiError::Store(format!("stored upgrade is unreadable: {e}"))),
            Ok(None) => Ok(None),
            Err(e) => Err(ApiError::Store(e.to_string())),
        }
    }

    async fn failed_over(&self, pool: &str) -> bool {
        matches!(self.node.env.store.get(&failover_key(pool)).await, Ok(Some(kv))
            if serde_json::from_slice::<serde_json::Value>(&kv.value).ok().and_then(|v| v.get("failed_over").and_then(serde_json::Value::as_bool)) == Some(true))
    }

    /// The current state of `pool`'s upgrade: the leader's live driver, else the store.
    async fn current(&self, pool: &str) -> Result<Option<Upgrade>, ApiError> {
        if self.node.leadership().is_some() {
            if let Some(h) = self.node.driver(pool) {
                if let Some(u) = h.status.borrow().clone() {
                    return Ok(Some(u));
                }
            }
        }
        Ok(self.stored(pool).await?.map(|s| s.upgrade))
    }

    fn status_of(&self, u: Option<&Upgrade>, pool: &str, dry_run: bool) -> pb::UpgradeStatus {
        let lead = self.node.leadership();
        let mut s = pb::UpgradeStatus {
            pool: pool.to_owned(),
            status: "none".into(),
            epoch: lead.as_ref().map_or(0, |l| l.epoch.get()),
            leader: if lead.is_some() {
                self.node.cfg.id.clone()
            } else {
                String::new()
            },
            dry_run,
            ..Default::default()
        };
        let Some(u) = u else { return s };
        let (status, reason) = match &u.status {
            UpStatus::Running => ("running", String::new()),
            UpStatus::Paused { reason } => ("paused", reason.clone()),
            UpStatus::Completed => ("completed", String::new()),
            UpStatus::Aborted { reason } => ("aborted", reason.clone()),
            UpStatus::Failed { reason } => ("failed", reason.clone()),
            UpStatus::RollingBack { reason } => ("rolling_back", reason.clone()),
            UpStatus::RolledBack => ("rolled_back", String::new()),
        };
        s.plan_id = u.plan.id.clone();
        s.version = u.plan.version.clone();
        s.status = status.into();
        s.reason = reason;
        s.direction = dir_name(u.direction).into();
        s.current_domain = u
            .plan
            .domains
            .get(u.domain_index)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        s.domain_phase = match u.domain_phase {
            DomainPhase::WaitingReady { .. } => "waiting_ready",
            DomainPhase::FailingOver => "failing_over",
            DomainPhase::InProgress => "in_progress",
            DomainPhase::Soaking => "soaking",
        }
        .into();
        s.domain_index = u32::try_from(u.domain_index).unwrap_or(u32::MAX);
        s.domains_total = u32::try_from(u.plan.domains.len()).unwrap_or(u32::MAX);
        s.failed_over = u.failed_over;
        s.plan_json = serde_json::to_string_pretty(&u.plan).unwrap_or_default();
        for d in &u.plan.domains {
            for server in &d.servers {
                let Some(p) = u.servers.get(server) else {
                    continue;
                };
                let (phase, step, attempt, message) = match &p.phase {
                    ServerPhase::Pending => ("pending", String::new(), 0, String::new()),
                    ServerPhase::InFlight { step, attempt } => {
                        ("in_flight", step.name().to_owned(), *attempt, String::new())
                    }
                    ServerPhase::Done => ("done", String::new(), 0, String::new()),
                    ServerPhase::Failed { step, message } => {
                        ("failed", step.name().to_owned(), 0, message.clone())
                    }
                };
                s.servers.push(pb::ServerProgress {
                    server: server.clone(),
                    domain: d.name.clone(),
                    phase: phase.into(),
                    step,
                    attempt,
                    message,
                    direction: dir_name(p.direction).into(),
                });
            }
        }
        s
    }

    fn plan_from(&self, r: &pb::StartUpgradeRequest) -> Result<Plan, ApiError> {
        let pool = self.pool(&r.pool)?;
        let spec = pool.spec();
        let invalid = |m: String| ApiError::Invalid(m);
        let ms = |v: u64, d: Duration| if v == 0 { d } else { Duration::from_millis(v) };
        let drain = match r.drain.as_str() {
            "" | "graceful" => DrainMode::Graceful {
                timeout: ms(r.drain_timeout_ms, Duration::from_secs(300)),
            },
            "immediate" => DrainMode::Immediate,
            other => {
                return Err(invalid(format!(
                    "drain: {other:?} is not graceful or immediate"
                )))
            }
        };
        let on_exhausted = match r.on_exhausted.as_str() {
            "" => {
                if pool.paired_pool.is_some() {
                    ExhaustedAction::Failover
                } else {
                    ExhaustedAction::Pause
                }
            }
            "failover" => ExhaustedAction::Failover,
            "pause" => ExhaustedAction::Pause,
            "abort" => ExhaustedAction::Abort,
            other => {
                return Err(invalid(format!(
                    "on_exhausted: {other:?} is not failover, pause or abort"
                )))
            }
        };
        let on_failure = match r.on_failure.as_str() {
            "" | "pause" => FailureAction::Pause,
            "rollback" => FailureAction::Rollback,
            other => {
                return Err(invalid(format!(
                    "on_failure: {other:?} is not pause or rollback"
                )))
            }
        };
        let mut domains: Vec<crate::engine::Domain> = spec
            .domains
            .iter()
            .map(|(name, servers)| crate::engine::Domain {
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
                            "domain_order: pool {} has no upgrade domain {name:?}",
                            r.pool
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
        if r.version.is_empty() {
            return Err(invalid("version: the target version is required".into()));
        }
        if r.artifact.is_empty() {
            return Err(invalid("artifact: a path or URL is required".into()));
        }
        let sha = r.sha256.trim().to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "sha256: {:?} is not 64 hex digits",
                r.sha256
            )));
        }
        let plan = Plan {
            id: format!("{}-{}", r.pool, rollgate_common::time::now_ms()),
            pool: r.pool.clone(),
            version: r.version.clone(),
            artifact: r.artifact.clone(),
            sha256: sha,
            drain,
            parallelism: if r.parallelism == 0 { 1 } else { r.parallelism },
            verify_stable: ms(r.verify_stable_ms, Duration::from_secs(5)),
            verify_timeout: ms(r.verify_timeout_ms, Duration::from_secs(120)),
            busy_retry_interval: ms(r.busy_retry_interval_ms, Duration::from_secs(600)),
            busy_retries: if r.busy_retries == 0 {
                3
            } else {
                r.busy_retries
            },
            on_exhausted,
            server_retries: r.server_retries,
            on_failure,
            domains,
            canary_soak: (r.canary_soak_ms > 0).then(|| Duration::from_millis(r.canary_soak_ms)),
            paired_pool: pool.paired_pool.clone(),
        };
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(plan)
    }

    async fn start(
        &self,
        r: pb::StartUpgradeRequest,
        by: &str,
    ) -> Result<pb::UpgradeStatus, ApiError> {
        let plan = self.plan_from(&r)?;
        if r.dry_run {
            let (u, _) = Upgrade::new(plan).map_err(|e| ApiError::Invalid(e.to_string()))?;
            return Ok(self.status_of(Some(&u), &r.pool, true));
        }
        let Some(lead) = self.node.leadership() else {
            return Err(self.not_leader().await);
        };
        let _one_at_a_time = self.node.start_lock.lock().await;
        if let Some(cur) = self.current(&r.pool).await? {
            if !cur.is_terminal() || cur.in_flight() > 0 {
                return Err(ApiError::AlreadyRunning(cur.plan.id, r.pool));
            }
        }
        let pool = self.pool(&r.pool)?.clone();
        let next_event = self.stored(&r.pool).await?.map_or(0, |s| s.next_event);
        let (u, mut actions) = Upgrade::new(plan).map_err(|e| ApiError::Invalid(e.to_string()))?;
        actions.insert(
            0,
            crate::engine::Action::Record {
                kind: "upgrade_requested".into(),
                server: None,
                domain: None,
                message: format!(
                    "{by} asked for version {} on pool {} (plan {})",
                    u.plan.version, u.plan.pool, u.plan.id
                ),
            },
        );
        let stored = Stored {
            upgrade: u,
            next_event,
        };
        self.node
            .start_driver(&lead, pool, stored.clone(), actions, false);
        Ok(self.status_of(Some(&stored.upgrade), &r.pool, false))
    }

    async fn command(
        &self,
        pool: &str,
        by: String,
        make: fn(String) -> Event,
    ) -> Result<pb::UpgradeStatus, ApiError> {
        self.pool(pool)?;
        if self.node.leadership().is_none() {
            return Err(self.not_leader().await);
        }
        let h = self
            .node
            .driver(pool)
            .ok_or_else(|| ApiError::NoUpgrade(pool.into()))?;
        let (tx, rx) = oneshot::channel();
        h.commands
            .send(Command {
                event: make(by),
                reply: tx,
            })
            .await
            .map_err(|_| ApiError::NoUpgrade(pool.into()))?;
        let u = rx
            .await
            .map_err(|_| ApiError::Lost("the driver stopped".into()))?
            .map_err(ApiError::Lost)?;
        Ok(self.status_of(Some(&u), pool, false))
    }

    async fn readiness(&self, pool: &str) -> Result<PoolReadiness, ApiError> {
        let spec = self.pool(pool)?.spec();
        let running = self.current(pool).await?.is_some_and(|u| u.in_flight() > 0);
        Ok(driver::evaluate(&self.node.env, &spec, running))
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Forward => "forward",
        Direction::Backward => "backward",
    }
}

fn readiness_of(r: &PoolReadiness, failed_over: bool) -> pb::PoolReadiness {
    pb::PoolReadiness {
        pool: r.pool.clone(),
        state: match r.state {
            crate::engine::PoolState::Ready => "Ready",
            crate::engine::PoolState::Busy => "Busy",
            crate::engine::PoolState::InsufficientActiveFrontEnds => "InsufficientActiveFrontEnds",
        }
        .into(),
        reason: r.reason.clone(),
        min_active: u32::try_from(r.min_active).unwrap_or(u32::MAX),
        active: u32::try_from(r.active).unwrap_or(u32::MAX),
        total: u32::try_from(r.total).unwrap_or(u32::MAX),
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
                        state: s.state.clone(),
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

type StatusStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::UpgradeStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::operator_server::Operator for OperatorApi {
    async fn readiness(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolReadiness>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        let r = self.readiness(&pool).await.map_err(to_status)?;
        Ok(Response::new(readiness_of(
            &r,
            self.failed_over(&pool).await,
        )))
    }

    async fn inventory(
        &self,
        req: Request<pb::InventoryRequest>,
    ) -> Result<Response<pb::InventoryResponse>, Status> {
        self.allow(&req)?;
        let mut pools = Vec::new();
        for p in &self.node.cfg.pools {
            let r = self.readiness(&p.name).await.map_err(to_status)?;
            pools.push(readiness_of(&r, self.failed_over(&p.name).await));
        }
        Ok(Response::new(pb::InventoryResponse { pools }))
    }

    async fn start_upgrade(
        &self,
        req: Request<pb::StartUpgradeRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        self.start(req.into_inner(), &by)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        self.pool(&pool).map_err(to_status)?;
        let u = self.current(&pool).await.map_err(to_status)?;
        Ok(Response::new(self.status_of(u.as_ref(), &pool, false)))
    }

    type WatchUpgradeStream = StatusStream;

    async fn watch_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<Self::WatchUpgradeStream>, Status> {
        self.allow(&req)?;
        let pool = req.into_inner().pool;
        self.pool(&pool).map_err(to_status)?;
        if self.node.leadership().is_none() {
            return Err(to_status(self.not_leader().await));
        }
        let rx = self.node.driver(&pool).map(|h| h.status);
        let me = self.clone();
        let Some(rx) = rx else {
            // Nothing running here: one status from the store, then the stream ends.
            let u = self.current(&pool).await.map_err(to_status)?;
            let s = self.status_of(u.as_ref(), &pool, false);
            return Ok(Response::new(Box::pin(futures_util::stream::iter([Ok(s)]))));
        };
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
                let done = u
                    .as_ref()
                    .is_none_or(|u| u.is_terminal() && u.in_flight() == 0);
                let s = me.status_of(u.as_ref(), &pool, false);
                Some((Ok(s), (rx, me, pool, done, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pause_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        self.command(&req.into_inner().pool, by, |by| Event::Pause { by })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn resume_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        self.command(&req.into_inner().pool, by, |by| Event::Resume { by })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn abort_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        self.command(&req.into_inner().pool, by, |by| Event::Abort { by })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn rollback_upgrade(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::UpgradeStatus>, Status> {
        let by = self.allow(&req)?;
        self.command(&req.into_inner().pool, by, |by| Event::Rollback { by })
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn failover(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolActionResponse>, Status> {
        let by = self.allow(&req)?;
        self.pool_action(&req.into_inner().pool, true, &by)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn failback(
        &self,
        req: Request<pb::PoolRequest>,
    ) -> Result<Response<pb::PoolActionResponse>, Status> {
        let by = self.allow(&req)?;
        self.pool_action(&req.into_inner().pool, false, &by)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<pb::EventsResponse>, Status> {
        self.allow(&req)?;
        let r = req.into_inner();
        self.pool(&r.pool).map_err(to_status)?;
        let kvs = self
            .node
            .env
            .store
            .range(&events_prefix(&r.pool))
            .await
            .map_err(|e| to_status(ApiError::Store(e.to_string())))?;
        let mut events: Vec<pb::Event> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<EventRecord>(&kv.value).ok())
            .map(|e| pb::Event {
                seq: e.seq,
                at_ms: e.at_ms,
                plan_id: e.plan_id,
                epoch: e.epoch,
                coordinator: e.coordinator,
                kind: e.kind,
                server: e.server,
                domain: e.domain,
                message: e.message,
            })
            .collect();
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        if events.len() > limit {
            events.drain(..events.len() - limit);
        }
        Ok(Response::new(pb::EventsResponse { events }))
    }

    async fn leader(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.allow(&req)?;
        let l = self
            .node
            .env
            .store
            .leader()
            .await
            .map_err(|e| to_status(ApiError::Store(e.to_string())))?;
        let mine = self.node.leadership();
        Ok(Response::new(match l {
            Some(l) => pb::LeaderResponse {
                this_is_leader: mine.is_some_and(|m| m.epoch == l.epoch),
                id: l.id,
                address: l.address,
                epoch: l.epoch.get(),
                this_id: self.node.cfg.id.clone(),
            },
            None => pb::LeaderResponse {
                this_id: self.node.cfg.id.clone(),
                ..Default::default()
            },
        }))
    }
}

impl OperatorApi {
    async fn pool_action(
        &self,
        pool: &str,
        over: bool,
        by: &str,
    ) -> Result<pb::PoolActionResponse, ApiError> {
        let cfg = self.pool(pool)?.clone();
        let Some(lead) = self.node.leadership() else {
            return Err(self.not_leader().await);
        };
        let paired = cfg.paired_pool.clone().ok_or_else(|| {
            ApiError::Invalid(format!("pool {pool} has no paired_pool to fail over to"))
        })?;
        let (ok, message) =
            driver::run_failover(&self.node.env, &lead, &cfg, pool, &paired, over, by).await;
        if !ok {
            return Err(ApiError::Hook(message));
        }
        Ok(pb::PoolActionResponse {
            pool: pool.into(),
            message,
            failed_over: over,
        })
    }
}
