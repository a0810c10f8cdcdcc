//! The gRPC adapter: converts wire types to domain types, checks the caller's role, and maps
//! domain errors to `tonic::Status` in one place ([`to_status`]). No logic lives here.

use crate::core::{AgentCore, Health, OnDrainTimeout, OpBody, OpHeader, Reply, ServiceState};
use crate::error::AgentError;
use crate::journal::{OpKind, OpRecord, OpState};
use futures_util::StreamExt;
use rollgate_common::quote::quoted;
use rollgate_common::time::{beat_offset, now_ms, until_next_beat};
use rollgate_common::tls::{authorize, authorize_roles, Role, RoleKind};
use rollgate_common::Epoch;
use rollgate_proto::agent::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// State-changing calls: coordinators only.
pub(crate) const WRITERS: &[RoleKind] = &[RoleKind::Coordinator];
/// Read-only calls: coordinators and operators.
pub(crate) const READERS: &[RoleKind] = &[RoleKind::Coordinator, RoleKind::Operator];
/// The longest any duration in a request may be: the coordinator's own bound on a plan's waits.
/// Beyond it a typo or a wrapped negative number (u64::MAX ms: 584 million years) would keep
/// the agent busy, refusing every other operation, until it is restarted.
const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

/// The `rollgate.agent.v1.Agent` service over an [`AgentCore`].
#[derive(Debug, Clone)]
pub struct AgentApi {
    core: Arc<AgentCore>,
    insecure: bool,
    /// The roles of a report line's client (its certificate was read once, at the handshake):
    /// requests on a line carry no certificate of their own.
    line_caller: Option<Arc<[Role]>>,
}

impl AgentApi {
    /// Serves `core`; `insecure` turns role checks off (only with TLS off).
    pub fn new(core: Arc<AgentCore>, insecure: bool) -> Self {
        AgentApi {
            core,
            insecure,
            line_caller: None,
        }
    }

    /// Serves the requests of one report line whose client proved `roles`, with the same
    /// checks and answers as the gRPC calls.
    pub fn for_line(core: Arc<AgentCore>, roles: Vec<Role>) -> Self {
        AgentApi {
            core,
            insecure: false,
            line_caller: Some(roles.into()),
        }
    }

    #[allow(clippy::result_large_err)]
    fn allow<T>(&self, req: &Request<T>, roles: &[RoleKind]) -> Result<(), Status> {
        match &self.line_caller {
            Some(caller) => authorize_roles(caller, roles).map(|_| ()),
            None => authorize(req, self.insecure, roles).map(|_| ()),
        }
    }

    fn ms(v: u64, default: Duration) -> Duration {
        if v == 0 {
            default
        } else {
            Duration::from_millis(v)
        }
    }

    async fn run(
        &self,
        header: Option<pb::OperationHeader>,
        body: OpBody,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let header = header_of(header).map_err(to_status)?;
        let reply = self.core.execute(header, body).await.map_err(to_status)?;
        Ok(Response::new(result_of(&reply)))
    }
}

/// Maps every agent error to a gRPC status. Retryable conditions use codes clients retry on.
/// Every refusal carries an [`pb::AgentErrorDetail`], so that callers act on the typed reason
/// (e.g. a stale epoch: step down) instead of parsing the message.
pub fn to_status(e: AgentError) -> Status {
    use crate::artifact::ArtifactError;
    use pb::AgentErrorReason as R;
    let msg = e.to_string();
    let mut detail = pb::AgentErrorDetail {
        retryable: e.is_retryable(),
        ..Default::default()
    };
    let (code, reason) = match &e {
        AgentError::InvalidArgument(_) => (tonic::Code::InvalidArgument, R::InvalidArgument),
        AgentError::StaleEpoch { current, .. } => {
            detail.current_epoch = current.get();
            (tonic::Code::FailedPrecondition, R::StaleEpoch)
        }
        AgentError::KindMismatch { .. } => (tonic::Code::FailedPrecondition, R::KindMismatch),
        AgentError::Precondition(_) => (tonic::Code::FailedPrecondition, R::Precondition),
        AgentError::Busy { running, .. } => {
            detail.running_operation_id = running.clone();
            (tonic::Code::Aborted, R::Busy)
        }
        AgentError::UnknownOperation(_) => (tonic::Code::NotFound, R::UnknownOperation),
        AgentError::Artifact(a) => match a {
            // A malformed digest or source is the caller's input, not the artifact's content.
            // A local source outside artifact_dirs, or one that cannot be read as a file, is
            // refused like any other bad source.
            ArtifactError::BadDigest(_)
            | ArtifactError::BadSource(_)
            | ArtifactError::NotAllowed { .. }
            | ArtifactError::Unreadable { .. } => {
                (tonic::Code::InvalidArgument, R::InvalidArgument)
            }
            ArtifactError::NotFound(_) => (tonic::Code::NotFound, R::Artifact),
            ArtifactError::Download { .. }
            | ArtifactError::ConnectTimedOut { .. }
            | ArtifactError::Stalled { .. }
            | ArtifactError::TimedOut { .. } => (tonic::Code::Unavailable, R::Artifact),
            ArtifactError::Io { .. } => (tonic::Code::Internal, R::Artifact),
            ArtifactError::TooLarge { .. }
            | ArtifactError::Mismatch { .. }
            | ArtifactError::NotRegular { .. } => (tonic::Code::InvalidArgument, R::Artifact),
        },
        AgentError::StateDir(_) | AgentError::Storage(_) => (tonic::Code::Internal, R::Storage),
        AgentError::ShuttingDown => (tonic::Code::Unavailable, R::ShuttingDown),
    };
    detail.reason = reason as i32;
    detail.to_status(code, msg)
}

/// A refusal of malformed input found in this adapter, with its typed detail.
fn invalid(message: String) -> Status {
    to_status(AgentError::InvalidArgument(message))
}

/// Refuses a duration field beyond [`MAX_WAIT_MS`].
#[allow(clippy::result_large_err)]
fn bounded(field: &str, ms: u64) -> Result<u64, Status> {
    if ms > MAX_WAIT_MS {
        return Err(invalid(format!(
            "{field} {ms} is beyond the upper bound of {MAX_WAIT_MS} (24 h)"
        )));
    }
    Ok(ms)
}

/// Refuses a version the service could not be told about: the install command gets it in its
/// environment, and it is reported and compared as is.
#[allow(clippy::result_large_err)]
fn check_version(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() || v.len() > 128 || !v.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{field} {} must be 1-128 printable ASCII characters without spaces",
            quoted(v)
        )));
    }
    Ok(())
}

fn header_of(h: Option<pb::OperationHeader>) -> Result<OpHeader, AgentError> {
    let h = h.ok_or_else(|| {
        AgentError::InvalidArgument("missing header (operation_id and epoch)".into())
    })?;
    OpHeader::new(&h.operation_id, h.epoch)
}

fn kind_of(k: OpKind) -> pb::OperationKind {
    match k {
        OpKind::Drain => pb::OperationKind::Drain,
        OpKind::Stop => pb::OperationKind::Stop,
        OpKind::Install => pb::OperationKind::Install,
        OpKind::Rollback => pb::OperationKind::Rollback,
        OpKind::Restart => pb::OperationKind::Restart,
        OpKind::Verify => pb::OperationKind::Verify,
    }
}

fn record_of(r: &OpRecord, replayed: bool) -> pb::OperationResult {
    pb::OperationResult {
        operation_id: r.id.clone(),
        kind: kind_of(r.kind) as i32,
        epoch: r.epoch.get(),
        state: match r.state {
            OpState::Running => pb::OperationState::Running,
            OpState::Succeeded => pb::OperationState::Succeeded,
            OpState::Failed => pb::OperationState::Failed,
            OpState::Interrupted => pb::OperationState::Interrupted,
        } as i32,
        started_at_ms: r.started_at_ms,
        finished_at_ms: r.finished_at_ms,
        message: r.message.clone(),
        replayed,
        version: r.version.clone(),
        output: r.output.clone(),
        attempt: r.attempt,
    }
}

fn result_of(reply: &Reply) -> pb::OperationResult {
    record_of(&reply.record, reply.replayed)
}

pub(crate) fn report_of(core: &AgentCore, h: &Health) -> pb::HealthReport {
    pb::HealthReport {
        server_id: core.cfg.server_id.clone(),
        pool: core.cfg.pool.clone(),
        upgrade_domain: core.cfg.upgrade_domain.clone(),
        installed_version: h.version.clone(),
        state: match h.state {
            ServiceState::Serving => pb::ServiceState::Serving,
            ServiceState::Draining => pb::ServiceState::Draining,
            ServiceState::Drained => pb::ServiceState::Drained,
            ServiceState::Stopped => pb::ServiceState::Stopped,
            ServiceState::Installing => pb::ServiceState::Installing,
            ServiceState::Starting => pb::ServiceState::Starting,
            ServiceState::Failed => pb::ServiceState::Failed,
        } as i32,
        accepting_connections: h.accepting,
        busy: h.busy,
        active_connections: h.active_connections,
        boot_id: core.boot_id.clone(),
        // Health goes out on every change and heartbeat: an operation's output (hook and
        // install logs) stays in OperationStatus, which asks for it.
        last_operation: h.last_op.as_ref().map(|r| pb::OperationResult {
            output: String::new(),
            ..record_of(r, true)
        }),
        healthy: h.healthy,
        epoch: h.epoch.get(),
        observed_at_ms: h.observed_at_ms,
        detail: h.detail.clone(),
        limits: Some(limits_of(&core.cfg.service)),
        installed_sha256: h.installed_sha256.clone(),
        previous_version: h.previous_version.clone(),
    }
}

/// The agent's reports as watchers get them (the Watch stream and the report line): one at
/// once, one on every change, and the last one again at this server's next beat on a wall-clock
/// grid of period `heartbeat_interval`, in its slot of it (never more than one interval after
/// the previous report). The
/// heartbeat comes from here, not from the probe task, so a probe that hangs for a while cannot
/// make this agent look lost. Ends at shutdown, so that graceful server shutdown is not held up
/// by open watchers.
pub(crate) fn reports(
    core: Arc<AgentCore>,
) -> impl futures_util::Stream<Item = pb::HealthReport> + Send + Unpin {
    let rx = core.subscribe();
    let stop = core.shutdown_token().clone();
    let beat = core.cfg.heartbeat_interval;
    let offset = beat_offset(&core.cfg.server_id, beat);
    Box::pin(futures_util::stream::unfold(
        (rx, stop, core, true),
        move |(mut rx, stop, core, first)| async move {
            if !first {
                tokio::select! {
                    changed = rx.changed() => changed.ok()?,
                    // On the wall-clock grid: at most `beat` after the last report.
                    _ = tokio::time::sleep(until_next_beat(now_ms(), beat, offset)) => {}
                    _ = stop.cancelled() => return None,
                }
            }
            let report = report_of(&core, &rx.borrow_and_update());
            Some((report, (rx, stop, core, false)))
        },
    ))
}

/// The agent's own time limits, so that callers derive their deadlines from them rather than
/// guess (a caller deadline shorter than the agent's limit cuts a step that would have passed).
fn limits_of(s: &crate::config::ServiceConfig) -> pb::AgentLimits {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    pb::AgentLimits {
        hook_timeout_ms: ms(s.hook_timeout),
        install_timeout_ms: ms(s.install_timeout),
        start_timeout_ms: ms(s.start_timeout),
        fetch_timeout_ms: ms(s.fetch_timeout),
        drain_timeout_ms: ms(s.drain_timeout),
        verify_timeout_ms: ms(s.verify_timeout),
    }
}

type ReportStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::HealthReport, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentApi {
    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReport>, Status> {
        self.allow(&req, READERS)?;
        let h = self.core.probe().await;
        Ok(Response::new(report_of(&self.core, &h)))
    }

    type WatchStream = ReportStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.allow(&req, READERS)?;
        let stream = reports(Arc::clone(&self.core)).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        self.allow(&req, WRITERS)?;
        let epoch = self
            .core
            .fence(Epoch(req.into_inner().epoch))
            .map_err(to_status)?;
        Ok(Response::new(pb::FenceResponse { epoch: epoch.get() }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        let r = req.into_inner();
        bounded("timeout_ms", r.timeout_ms)?;
        let on_timeout = match pb::DrainTimeoutAction::try_from(r.on_timeout) {
            Ok(pb::DrainTimeoutAction::Force) => OnDrainTimeout::Force,
            Ok(pb::DrainTimeoutAction::Fail | pb::DrainTimeoutAction::Unspecified) => {
                OnDrainTimeout::Fail
            }
            Err(_) => {
                return Err(invalid(format!(
                    "on_timeout {} is not a drain timeout action",
                    r.on_timeout
                )))
            }
        };
        let timeout = Self::ms(r.timeout_ms, self.core.cfg.service.drain_timeout);
        self.run(
            r.header,
            OpBody::Drain {
                timeout,
                on_timeout,
            },
        )
        .await
    }

    async fn stop(
        &self,
        req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        self.run(req.into_inner().header, OpBody::Stop).await
    }

    async fn install_patch(
        &self,
        req: Request<pb::InstallPatchRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        let r = req.into_inner();
        bounded("timeout_ms", r.timeout_ms)?;
        let header = header_of(r.header.clone()).map_err(to_status)?;
        check_version("version", &r.version)?;
        let sha256 = crate::artifact::parse_digest(&r.sha256).map_err(|e| to_status(e.into()))?;
        if r.prepare_only {
            let reply = self
                .core
                .prepare_install(&header, &r.artifact, &sha256, &r.version)
                .await
                .map_err(to_status)?;
            return Ok(Response::new(result_of(&reply)));
        }
        // A repeated id is answered before any download; a bad artifact is refused before
        // anything is journaled or run.
        if let Some(reply) = self
            .core
            .precheck(&header, OpKind::Install)
            .map_err(to_status)?
        {
            return Ok(Response::new(result_of(&reply)));
        }
        let artifact = if self.core.is_running(&header.id) {
            // Adopting the running install: it has its artifact; this body is not used.
            self.core.artifact_path(&sha256)
        } else {
            self.core
                .fetch_artifact(&r.artifact, &sha256)
                .await
                .map_err(to_status)?
        };
        let timeout = Self::ms(r.timeout_ms, self.core.cfg.service.install_timeout);
        self.run(
            r.header,
            OpBody::Install {
                artifact,
                sha256,
                version: r.version,
                timeout,
            },
        )
        .await
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        let r = req.into_inner();
        bounded("timeout_ms", r.timeout_ms)?;
        let header = header_of(r.header.clone()).map_err(to_status)?;
        // Empty: whatever is installed. Anything else is compared with the installed version,
        // so it must be one.
        if !r.from_version.is_empty() {
            check_version("from_version", &r.from_version)?;
        }
        let fallback = match (r.fallback_artifact.is_empty(), r.fallback_sha256.is_empty()) {
            (true, true) => None,
            (false, false) => Some((
                r.fallback_artifact.as_str(),
                crate::artifact::parse_digest(&r.fallback_sha256)
                    .map_err(|e| to_status(e.into()))?,
            )),
            _ => {
                return Err(invalid(
                    "fallback_artifact and fallback_sha256 go together: give both or neither"
                        .into(),
                ))
            }
        };
        if r.prepare_only {
            let reply = self
                .core
                .prepare_rollback(
                    &header,
                    &r.from_version,
                    fallback.as_ref().map(|(a, s)| (*a, s.as_str())),
                )
                .await
                .map_err(to_status)?;
            return Ok(Response::new(result_of(&reply)));
        }
        // As for an install: a repeated id is answered before any download, and the fallback
        // is fetched and verified before admission, only when the rollback needs it.
        if let Some(reply) = self
            .core
            .precheck(&header, OpKind::Rollback)
            .map_err(to_status)?
        {
            return Ok(Response::new(result_of(&reply)));
        }
        let fallback_sha256 = match fallback {
            Some((source, sha256))
                if !self.core.is_running(&header.id)
                    && self.core.rollback_needs_artifact(&r.from_version) =>
            {
                self.core
                    .fetch_artifact(source, &sha256)
                    .await
                    .map_err(to_status)?;
                Some(sha256)
            }
            _ => None,
        };
        let timeout = Self::ms(r.timeout_ms, self.core.cfg.service.install_timeout);
        self.run(
            r.header,
            OpBody::Rollback {
                timeout,
                from_version: r.from_version,
                fallback_sha256,
            },
        )
        .await
    }

    async fn restart(
        &self,
        req: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        let r = req.into_inner();
        bounded("timeout_ms", r.timeout_ms)?;
        bounded("drain_timeout_ms", r.drain_timeout_ms)?;
        let timeout = Self::ms(r.timeout_ms, self.core.cfg.service.start_timeout);
        let drain_first = r
            .drain_if_accepting
            .then(|| Self::ms(r.drain_timeout_ms, self.core.cfg.service.drain_timeout));
        self.run(
            r.header,
            OpBody::Restart {
                timeout,
                drain_first,
            },
        )
        .await
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, WRITERS)?;
        let r = req.into_inner();
        bounded("timeout_ms", r.timeout_ms)?;
        if let Some(stable) = r.stable_ms {
            bounded("stable_ms", stable)?;
        }
        // Unset: the agent's default; an explicit 0: one good probe is enough.
        let stable = r
            .stable_ms
            .map_or(self.core.cfg.service.verify_stable, Duration::from_millis);
        let timeout = Self::ms(r.timeout_ms, self.core.cfg.service.verify_timeout);
        if stable > timeout {
            return Err(invalid(format!(
                "stable_ms {} is longer than timeout_ms {}: verify could never pass",
                stable.as_millis(),
                timeout.as_millis()
            )));
        }
        self.run(r.header, OpBody::Verify { stable, timeout }).await
    }

    async fn operation_status(
        &self,
        req: Request<pb::OperationStatusRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        self.allow(&req, READERS)?;
        let rec = self
            .core
            .operation(&req.into_inner().operation_id)
            .map_err(to_status)?;
        Ok(Response::new(record_of(&rec, true)))
    }
}
