//! One simulated agent: the real `rollgate.agent.v1.Agent` contract (epochs and fencing,
//! idempotent operation ids, adoption of a running operation, OperationStatus, Health and the
//! Watch stream) over an in-memory server whose steps only sleep.

use super::gate::Mode;
use super::Identity;
use rollgate_proto::agent::v1 as pb;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Microseconds since the Unix epoch: comparable with the benchmark's own clock.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The longest a caller waits for a running operation here (its own deadline usually ends it
/// sooner).
const ADOPT_LIMIT: Duration = Duration::from_secs(300);

/// A step's effect on the agent once its time has passed: Ok(message) or Err(why it failed).
type Finish = Box<dyn FnOnce(&mut State) -> Result<String, String> + Send>;

#[derive(Debug)]
struct State {
    epoch: u64,
    /// Every epoch raise: (epoch, unix µs), so that the benchmark can ask when an epoch arrived.
    raised: Vec<(u64, u64)>,
    version: String,
    previous: String,
    sha256: String,
    service: pb::ServiceState,
    ops: HashMap<String, pb::OperationResult>,
    running: Option<String>,
    last_op: Option<pb::OperationResult>,
    /// When the first operation call since the last mark arrived (unix µs).
    first_call_us: Option<u64>,
}

/// How far apart the simulated agents' clocks are: real agents beat on their own servers'
/// wall clocks, which NTP keeps within a few ms of each other, while the simulated ones share
/// one clock; each gets a fixed offset in [0, CLOCK_SKEW) on top of its slot, so that the
/// coordinator does not see them in perfect step.
pub const CLOCK_SKEW: Duration = Duration::from_millis(10);

/// A server's heartbeat offset: its slot, as the real agent's, plus a fixed skew in
/// [0, [`CLOCK_SKEW`]) spread by a hash of its id.
fn beat_offset_of(server_id: &str, beat: Duration) -> Duration {
    use rollgate_common::time::{beat_offset, id_hash, BEAT_SLOTS};
    // The hash's low digits chose the slot; the skew comes from the ones above them.
    let h = id_hash(server_id) / BEAT_SLOTS;
    let ms = u64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(1).max(1);
    beat_offset(server_id, beat) + Duration::from_millis(h % ms)
}

/// A simulated agent's state, shared by its gRPC service, its listener and the control.
#[derive(Debug)]
pub struct SimAgent {
    /// Who it is.
    pub id: Identity,
    step: Duration,
    report_interval: Duration,
    /// Where this agent's heartbeat grid sits against the others' (see [`CLOCK_SKEW`]).
    beat_offset: Duration,
    state: Mutex<State>,
    /// Bumped on every change of `state`: Watch streams and adopted calls wait on it.
    changed: watch::Sender<u64>,
    /// Crash / hang / up, followed by its listener and connections.
    pub mode: watch::Sender<Mode>,
}

impl SimAgent {
    /// Raises the epoch (the Fence call and the report line's fence).
    #[allow(clippy::result_large_err)]
    pub fn fence(&self, epoch: u64) -> Result<pb::FenceResponse, Status> {
        let now = {
            let mut s = self.lock();
            self.admit(&mut s, epoch)?;
            s.epoch
        };
        self.bump();
        Ok(pb::FenceResponse { epoch: now })
    }

    /// Serves a report line (the real agent's contract) over `io` until it closes or `stop`:
    /// every request is answered by the same [`AgentService`] method as its gRPC call.
    pub async fn serve_line<IO>(self: Arc<Self>, io: IO, stop: tokio_util::sync::CancellationToken)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use futures_util::StreamExt;
        let reports = async_reports(
            Arc::clone(&self),
            self.changed.subscribe(),
            self.mode.subscribe(),
        )
        .filter_map(|r| std::future::ready(r.ok()));
        let service = AgentService(Arc::clone(&self));
        let answer = move |req: pb::LineRequest| {
            let api = service.clone();
            async move { rollgate_proto::line::answer(&api, req).await }
        };
        let _ = rollgate_proto::line::serve(io, Box::pin(reports), answer, stop.cancelled_owned())
            .await;
    }

    /// A serving agent with `version` installed at epoch 0.
    pub fn new(id: Identity, version: &str, step: Duration, report_interval: Duration) -> Self {
        let beat_offset = beat_offset_of(&id.server_id, report_interval);
        SimAgent {
            id,
            step,
            report_interval,
            beat_offset,
            state: Mutex::new(State {
                epoch: 0,
                raised: Vec::new(),
                version: version.to_owned(),
                previous: String::new(),
                sha256: String::new(),
                service: pb::ServiceState::Serving,
                ops: HashMap::new(),
                running: None,
                last_op: None,
                first_call_us: None,
            }),
            changed: watch::channel(0).0,
            mode: watch::channel(Mode::Up).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// When this agent first accepted an epoch of at least `epoch` (unix µs).
    pub fn fenced_at(&self, epoch: u64) -> Option<u64> {
        self.lock()
            .raised
            .iter()
            .find(|(e, _)| *e >= epoch)
            .map(|(_, at)| *at)
    }

    /// The installed version.
    pub fn version(&self) -> String {
        self.lock().version.clone()
    }

    /// When the first operation call since the last [`SimAgent::mark`] arrived.
    pub fn first_call_us(&self) -> Option<u64> {
        self.lock().first_call_us
    }

    /// Forgets when the first operation call arrived, to time the next one.
    pub fn mark(&self) {
        self.lock().first_call_us = None;
    }

    fn report(&self) -> pb::HealthReport {
        let s = self.lock();
        let serving = s.service == pb::ServiceState::Serving;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let limit = ms(self.step) + 30_000;
        pb::HealthReport {
            server_id: self.id.server_id.clone(),
            pool: self.id.pool.clone(),
            upgrade_domain: self.id.domain.clone(),
            installed_version: s.version.clone(),
            state: s.service as i32,
            accepting_connections: serving,
            busy: false,
            active_connections: 0,
            boot_id: "fleet-simulator".into(),
            last_operation: s.last_op.clone(),
            healthy: true,
            epoch: s.epoch,
            observed_at_ms: unix_us() / 1000,
            detail: String::new(),
            limits: Some(pb::AgentLimits {
                hook_timeout_ms: limit,
                install_timeout_ms: limit,
                start_timeout_ms: limit,
                fetch_timeout_ms: limit,
                drain_timeout_ms: limit,
                verify_timeout_ms: limit,
            }),
            installed_sha256: s.sha256.clone(),
            previous_version: s.previous.clone(),
        }
    }

    /// Raises the epoch to `epoch`, or refuses an older one as the real agent does.
    fn admit(&self, s: &mut State, epoch: u64) -> Result<(), Status> {
        if epoch == 0 {
            return Err(refusal(
                pb::AgentErrorReason::InvalidArgument,
                tonic::Code::InvalidArgument,
                "epoch must be > 0".into(),
            ));
        }
        if epoch < s.epoch {
            let detail = pb::AgentErrorDetail {
                reason: pb::AgentErrorReason::StaleEpoch as i32,
                current_epoch: s.epoch,
                ..Default::default()
            };
            return Err(detail.to_status(
                tonic::Code::FailedPrecondition,
                format!("stale epoch {epoch}: this agent has accepted {}", s.epoch),
            ));
        }
        if epoch > s.epoch {
            s.epoch = epoch;
            s.raised.push((epoch, unix_us()));
        }
        Ok(())
    }

    /// Runs (or replays, or adopts) one operation: `during` is the service state while it
    /// runs, `finish` applies its effect and says how it ended.
    async fn operate(
        self: &Arc<Self>,
        header: Option<pb::OperationHeader>,
        kind: pb::OperationKind,
        during: pb::ServiceState,
        finish: Finish,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let h = header.ok_or_else(|| invalid("missing header (operation_id and epoch)"))?;
        if h.operation_id.is_empty() || h.operation_id.len() > 128 {
            return Err(invalid("operation_id must be 1 to 128 characters"));
        }
        let id = h.operation_id;
        let mut changes = self.changed.subscribe();
        {
            let mut s = self.lock();
            self.admit(&mut s, h.epoch)?;
            s.first_call_us.get_or_insert_with(unix_us);
            match s.ops.get(&id) {
                Some(r) if r.kind != kind as i32 => {
                    return Err(refusal(
                        pb::AgentErrorReason::KindMismatch,
                        tonic::Code::FailedPrecondition,
                        format!("operation {id} is journaled with another kind"),
                    ))
                }
                Some(r) if r.state != pb::OperationState::Running as i32 => {
                    let mut r = r.clone();
                    r.replayed = true;
                    return Ok(Response::new(r));
                }
                // Running: adopt it, below.
                Some(_) => {}
                None => {
                    if let Some(running) = s.running.clone() {
                        let detail = pb::AgentErrorDetail {
                            reason: pb::AgentErrorReason::Busy as i32,
                            running_operation_id: running.clone(),
                            retryable: true,
                            ..Default::default()
                        };
                        return Err(detail.to_status(
                            tonic::Code::Aborted,
                            format!("busy: operation {running} is running"),
                        ));
                    }
                    let record = pb::OperationResult {
                        operation_id: id.clone(),
                        kind: kind as i32,
                        epoch: h.epoch,
                        state: pb::OperationState::Running as i32,
                        started_at_ms: unix_us() / 1000,
                        attempt: 1,
                        version: s.version.clone(),
                        ..Default::default()
                    };
                    s.ops.insert(id.clone(), record);
                    s.running = Some(id.clone());
                    s.service = during;
                    let me = Arc::clone(self);
                    let op = id.clone();
                    // Runs on even if the caller gives up, as a real step would.
                    tokio::spawn(async move {
                        tokio::time::sleep(me.step).await;
                        let mut s = me.lock();
                        let outcome = finish(&mut s);
                        let version = s.version.clone();
                        s.running = None;
                        if let Some(r) = s.ops.get_mut(&op) {
                            r.finished_at_ms = unix_us() / 1000;
                            r.version = version;
                            match outcome {
                                Ok(m) => {
                                    r.state = pb::OperationState::Succeeded as i32;
                                    r.message = m;
                                }
                                Err(m) => {
                                    r.state = pb::OperationState::Failed as i32;
                                    r.message = m;
                                }
                            }
                            let done = r.clone();
                            s.last_op = Some(done);
                        }
                        drop(s);
                        me.bump();
                    });
                }
            }
            if h.epoch > s.ops.get(&id).map_or(0, |r| r.epoch) {
                if let Some(r) = s.ops.get_mut(&id) {
                    r.epoch = h.epoch;
                }
            }
        }
        self.bump();
        let wait = async {
            loop {
                if let Some(r) = self.lock().ops.get(&id) {
                    if r.state != pb::OperationState::Running as i32 {
                        return Ok(r.clone());
                    }
                }
                if changes.changed().await.is_err() {
                    return Err(Status::unavailable("simulated agent stopped"));
                }
            }
        };
        match tokio::time::timeout(ADOPT_LIMIT, wait).await {
            Ok(r) => r.map(Response::new),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "operation {id} still running after {ADOPT_LIMIT:?}"
            ))),
        }
    }
}

fn refusal(reason: pb::AgentErrorReason, code: tonic::Code, message: String) -> Status {
    pb::AgentErrorDetail {
        reason: reason as i32,
        ..Default::default()
    }
    .to_status(code, message)
}

fn invalid(message: &str) -> Status {
    refusal(
        pb::AgentErrorReason::InvalidArgument,
        tonic::Code::InvalidArgument,
        message.into(),
    )
}

fn prepared(what: &str) -> Response<pb::OperationResult> {
    // Prepare-only calls check and cache; nothing is journaled, as on the real agent.
    Response::new(pb::OperationResult {
        state: pb::OperationState::Succeeded as i32,
        message: format!("{what} prepared"),
        ..Default::default()
    })
}

/// The gRPC face of a [`SimAgent`].
#[derive(Debug, Clone)]
pub struct AgentService(pub Arc<SimAgent>);

type ReportStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::HealthReport, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReport>, Status> {
        Ok(Response::new(self.0.report()))
    }

    type WatchStream = ReportStream;

    async fn watch(
        &self,
        _req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let agent = Arc::clone(&self.0);
        let changes = agent.changed.subscribe();
        let mode = agent.mode.subscribe();
        let stream = async_reports(agent, changes, mode);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let epoch = req.into_inner().epoch;
        Ok(Response::new(self.0.fence(epoch)?))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        self.0
            .operate(
                r.header,
                pb::OperationKind::Drain,
                pb::ServiceState::Draining,
                Box::new(|s| {
                    s.service = pb::ServiceState::Drained;
                    Ok("drained".into())
                }),
            )
            .await
    }

    async fn stop(
        &self,
        req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        self.0
            .operate(
                r.header,
                pb::OperationKind::Stop,
                pb::ServiceState::Stopped,
                Box::new(|s| {
                    s.service = pb::ServiceState::Stopped;
                    Ok("stopped".into())
                }),
            )
            .await
    }

    async fn install_patch(
        &self,
        req: Request<pb::InstallPatchRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        if r.prepare_only {
            return Ok(prepared("install"));
        }
        let (version, sha) = (r.version, r.sha256);
        self.0
            .operate(
                r.header,
                pb::OperationKind::Install,
                pb::ServiceState::Installing,
                Box::new(move |s| {
                    if s.version != version {
                        s.previous = std::mem::replace(&mut s.version, version);
                    }
                    s.sha256 = sha;
                    s.service = pb::ServiceState::Stopped;
                    Ok(format!("installed {}", s.version))
                }),
            )
            .await
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        if r.prepare_only {
            return Ok(prepared("rollback"));
        }
        let from = r.from_version;
        self.0
            .operate(
                r.header,
                pb::OperationKind::Rollback,
                pb::ServiceState::Installing,
                Box::new(move |s| {
                    if !from.is_empty() && s.version != from {
                        return Ok(format!("{from} is not installed: nothing to roll back"));
                    }
                    if s.previous.is_empty() {
                        return Err("no previous version known".into());
                    }
                    std::mem::swap(&mut s.version, &mut s.previous);
                    s.service = pb::ServiceState::Stopped;
                    Ok(format!("rolled back to {}", s.version))
                }),
            )
            .await
    }

    async fn restart(
        &self,
        req: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        self.0
            .operate(
                r.header,
                pb::OperationKind::Restart,
                pb::ServiceState::Starting,
                Box::new(|s| {
                    s.service = pb::ServiceState::Serving;
                    Ok("started".into())
                }),
            )
            .await
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let r = req.into_inner();
        let serving_before = self.0.lock().service;
        self.0
            .operate(
                r.header,
                pb::OperationKind::Verify,
                serving_before,
                Box::new(|s| {
                    if s.service == pb::ServiceState::Serving {
                        Ok("verified".into())
                    } else {
                        Err(format!("service is {:?}, not serving", s.service))
                    }
                }),
            )
            .await
    }

    async fn operation_status(
        &self,
        req: Request<pb::OperationStatusRequest>,
    ) -> Result<Response<pb::OperationResult>, Status> {
        let id = req.into_inner().operation_id;
        match self.0.lock().ops.get(&id) {
            Some(r) => {
                let mut r = r.clone();
                r.replayed = true;
                Ok(Response::new(r))
            }
            None => Err(refusal(
                pb::AgentErrorReason::UnknownOperation,
                tonic::Code::NotFound,
                format!("unknown operation {id}"),
            )),
        }
    }
}

/// One report at once, then one on every change and at the beats of the wall-clock grid, as the
/// real agent sends them; silent while hung, ended by a crash.
fn async_reports(
    agent: Arc<SimAgent>,
    changes: watch::Receiver<u64>,
    mode: watch::Receiver<Mode>,
) -> impl futures_util::Stream<Item = Result<pb::HealthReport, Status>> + Send {
    futures_util::stream::unfold(
        (agent, changes, mode, true),
        |(agent, mut changes, mut mode, first)| async move {
            if !first {
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(rollgate_common::time::until_next_beat(
                        rollgate_common::time::now_ms(),
                        agent.report_interval,
                        agent.beat_offset,
                    )) => {}
                }
            }
            let up = mode.wait_for(|m| *m != Mode::Hung).await.ok()?;
            if *up == Mode::Crashed {
                return None;
            }
            drop(up);
            let report = agent.report();
            Some((Ok(report), (agent, changes, mode, false)))
        },
    )
}
