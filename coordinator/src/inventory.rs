//! The live inventory: one health stream per agent, kept in memory (no store write per
//! report), and [`AgentLink`] over tonic: the calls the leader makes to agents, with the
//! agents' typed refusals (status details) turned into [`LinkError`]s.
//!
//! With TLS, the health stream is the report line ([`crate::report_line`]), which also carries
//! the fence and a report on demand: an idle agent costs a TLS session, not an HTTP/2
//! connection. The gRPC client for the steps is made on first use and dropped after
//! [`CLIENT_IDLE`] unused. An agent that does not speak the line (an older one) gets the gRPC
//! Watch stream, as does every agent without TLS.

use crate::agent_tls::{AgentTls, Refusal};
use crate::config::PoolSpec;
use crate::health::SharedHealth;
use crate::link::{AgentCommand, AgentLimits, AgentLink, LinkError, OpReply, OpState};
use crate::readiness::{AgentState, Clocks, PoolReadiness, ServerHealth};
use crate::report_line::{self, AskError, LineQueue};
use rollgate_common::Epoch;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_client::AgentClient;
use rollgate_proto::agent::v1::line_request::Kind as LineKind;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How long a step's gRPC client to an agent is kept unused before its connection is closed
/// (the next step makes a new one; an upgrade's steps follow each other far faster).
pub const CLIENT_IDLE: Duration = Duration::from_secs(120);

/// How long a report line may stay silent before it is taken for dead: agents send a heartbeat
/// every 500 ms by default, and `lost_after` has already counted them lost long before.
pub fn line_idle(lost_after: Duration) -> Duration {
    (lost_after * 2).max(Duration::from_secs(15))
}

/// Health of every known server, a clock to stamp it with, and a client per agent.
#[derive(Debug)]
pub struct Inventory {
    start: Instant,
    health: SharedHealth,
    /// Per server, when (agent's clock) the newest report applied was probed.
    observed: std::sync::Mutex<HashMap<String, u64>>,
    /// One line per agent; it changes as servers join and leave.
    agents: RwLock<BTreeMap<String, Line>>,
    tls: Option<AgentTls>,
    /// Where health streams run once [`Inventory::watch_all`] was called, and this inventory
    /// itself (to start a stream for an agent that joins later).
    watching: std::sync::Mutex<Option<Watching>>,
}

#[derive(Debug, Clone)]
struct Watching {
    tasks: TaskTracker,
    stop: CancellationToken,
    me: std::sync::Weak<Inventory>,
    line_idle: Duration,
}

/// The line to one agent.
#[derive(Debug, Clone)]
struct Line {
    address: String,
    /// The gRPC client for steps: made on first use, dropped after [`CLIENT_IDLE`] unused.
    client: Arc<Mutex<Option<AgentClient<Channel>>>>,
    /// When (inventory clock, ms) the client was last handed out.
    used_ms: Arc<AtomicU64>,
    /// Why its identity was refused (TLS only).
    refusal: Option<Refusal>,
    /// Stops its health stream.
    stop: CancellationToken,
    /// Requests for its report line, while one is up.
    queue: Arc<LineQueue>,
}

/// Why an agent client could not be made.
#[derive(Debug, thiserror::Error)]
#[error("agent {server} at {address}: {message}")]
pub struct ClientError {
    /// The server.
    pub server: String,
    /// Its configured address.
    pub address: String,
    /// What is wrong.
    pub message: String,
}

/// Maps a wire service state to the domain's.
pub fn agent_state(s: i32) -> AgentState {
    match pb::ServiceState::try_from(s) {
        Ok(pb::ServiceState::Serving) => AgentState::Serving,
        Ok(pb::ServiceState::Draining) => AgentState::Draining,
        Ok(pb::ServiceState::Drained) => AgentState::Drained,
        Ok(pb::ServiceState::Stopped) => AgentState::Stopped,
        Ok(pb::ServiceState::Installing) => AgentState::Installing,
        Ok(pb::ServiceState::Starting) => AgentState::Starting,
        Ok(pb::ServiceState::Failed) => AgentState::Failed,
        Ok(pb::ServiceState::Unspecified) | Err(_) => AgentState::Unknown,
    }
}

/// The line to `server`'s agent at `address`: nothing is connected yet. The address is
/// checked here, so that a bad one is refused when the agent is added.
fn line(server: &str, address: &str, tls: Option<&AgentTls>) -> Result<Line, ClientError> {
    endpoint(server, address)?;
    let queue = LineQueue::default();
    // Until a watch task dials the line, requests go over gRPC (and without TLS there is no
    // ALPN to choose the line with, so they always do).
    queue.set_grpc_only(true);
    Ok(Line {
        address: address.to_owned(),
        client: Arc::new(Mutex::new(None)),
        used_ms: Arc::new(AtomicU64::new(0)),
        refusal: tls.map(|_| Refusal::default()),
        stop: CancellationToken::new(),
        queue: Arc::new(queue),
    })
}

fn endpoint(server: &str, address: &str) -> Result<Endpoint, ClientError> {
    // The scheme only labels requests: with TLS the connector does the handshake.
    Endpoint::from_shared(format!("http://{address}"))
        .map(|ep| {
            ep.connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|e| ClientError {
            server: server.to_owned(),
            address: address.to_owned(),
            message: e.to_string(),
        })
}

/// A lazily-connecting gRPC client to `server`'s agent. With `tls`, every connection checks
/// that the agent's certificate names that server.
fn grpc_client(
    server: &str,
    line: &Line,
    tls: Option<&AgentTls>,
) -> Result<AgentClient<Channel>, ClientError> {
    let ep = endpoint(server, &line.address)?;
    let channel = match (tls, &line.refusal) {
        (Some(t), Some(refusal)) => {
            ep.connect_with_connector_lazy(t.connector(server, Arc::clone(refusal)))
        }
        _ => ep.connect_lazy(),
    };
    Ok(AgentClient::new(channel).max_decoding_message_size(1 << 20))
}

fn limits_of(l: &pb::AgentLimits) -> AgentLimits {
    let d = AgentLimits::default();
    let ms = |v: u64, default: Duration| {
        if v == 0 {
            default
        } else {
            Duration::from_millis(v)
        }
    };
    AgentLimits {
        hook: ms(l.hook_timeout_ms, d.hook),
        install: ms(l.install_timeout_ms, d.install),
        start: ms(l.start_timeout_ms, d.start),
        fetch: ms(l.fetch_timeout_ms, d.fetch),
    }
}

/// Turns an agent's refusal (or a transport failure) into what the caller does next. The
/// agent's typed detail decides; the status code is only a fallback for transport errors.
pub fn link_error(s: &tonic::Status) -> LinkError {
    let message = s.message().to_string();
    if let Some(d) = pb::AgentErrorDetail::from_status(s) {
        return match d.reason_or_unspecified() {
            pb::AgentErrorReason::StaleEpoch => LinkError::StaleEpoch {
                current: d.current_epoch,
                message,
            },
            pb::AgentErrorReason::Busy => LinkError::Busy {
                running: d.running_operation_id,
                message,
            },
            pb::AgentErrorReason::UnknownOperation => LinkError::NotFound(message),
            _ if d.retryable => LinkError::Retryable(message),
            _ => LinkError::Refused(message),
        };
    }
    match s.code() {
        Code::Unavailable | Code::Unknown => LinkError::Unreachable(message),
        Code::DeadlineExceeded | Code::Cancelled => LinkError::TimedOut(message),
        Code::Aborted | Code::ResourceExhausted | Code::Internal => LinkError::Retryable(message),
        Code::NotFound => LinkError::NotFound(message),
        _ => LinkError::Refused(message),
    }
}

fn op_reply(r: pb::OperationResult) -> OpReply {
    let state = match pb::OperationState::try_from(r.state) {
        Ok(pb::OperationState::Succeeded) => OpState::Succeeded,
        Ok(pb::OperationState::Failed) => OpState::Failed,
        Ok(pb::OperationState::Running) => OpState::Running,
        _ => OpState::Interrupted,
    };
    OpReply {
        state,
        message: r.message,
    }
}

/// A request with a gRPC deadline (bounded: gRPC's header cannot carry years).
fn with_deadline<T>(limit: Duration, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(limit.min(Duration::from_secs(3 * 24 * 3600)));
    r
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long a call waits for a report line that is down to come up before it counts the agent
/// unreachable (what a TCP and TLS connect would have taken at most).
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// The wire request for `command` (a line request; the gRPC call takes the same message).
fn request_of(command: &AgentCommand, header: pb::OperationHeader) -> LineKind {
    let header = Some(header);
    match command {
        AgentCommand::PrepareInstall {
            artifact,
            sha256,
            version,
        }
        | AgentCommand::Install {
            artifact,
            sha256,
            version,
        } => LineKind::InstallPatch(pb::InstallPatchRequest {
            header,
            artifact: artifact.clone(),
            sha256: sha256.clone(),
            version: version.clone(),
            timeout_ms: 0,
            prepare_only: matches!(command, AgentCommand::PrepareInstall { .. }),
        }),
        AgentCommand::PrepareRollback {
            from_version,
            fallback,
        }
        | AgentCommand::Rollback {
            from_version,
            fallback,
        } => {
            let (fallback_artifact, fallback_sha256) = fallback
                .as_ref()
                .map(|f| (f.artifact.clone(), f.sha256.clone()))
                .unwrap_or_default();
            LineKind::Rollback(pb::RollbackRequest {
                header,
                timeout_ms: 0,
                from_version: from_version.clone(),
                prepare_only: matches!(command, AgentCommand::PrepareRollback { .. }),
                fallback_artifact,
                fallback_sha256,
            })
        }
        AgentCommand::Drain { timeout } => LineKind::Drain(pb::DrainRequest {
            header,
            // 0 would mean the agent's default: a drain of zero waits 1 ms.
            timeout_ms: ms(*timeout).max(1),
            on_timeout: pb::DrainTimeoutAction::Fail as i32,
        }),
        AgentCommand::Stop => LineKind::Stop(pb::StopRequest { header }),
        AgentCommand::Restart { drain_first } => LineKind::Restart(pb::RestartRequest {
            header,
            timeout_ms: 0,
            drain_if_accepting: drain_first.is_some(),
            drain_timeout_ms: drain_first.map_or(0, |d| ms(d).max(1)),
        }),
        // Always set: an explicit zero means "one good probe", not "the default".
        AgentCommand::Verify { stable, timeout } => LineKind::Verify(pb::VerifyRequest {
            header,
            stable_ms: Some(ms(*stable)),
            timeout_ms: ms(*timeout).max(1),
        }),
    }
}

impl Inventory {
    /// Makes a lazily-connecting client for every `(server, address)`. With `tls`, every
    /// connection checks that the agent's certificate names that server.
    pub fn new(
        agents: &[(String, String)],
        tls: Option<AgentTls>,
    ) -> Result<Inventory, ClientError> {
        let mut lines = BTreeMap::new();
        for (server, address) in agents {
            lines.insert(server.clone(), line(server, address, tls.as_ref())?);
        }
        Ok(Inventory {
            start: Instant::now(),
            health: SharedHealth::default(),
            observed: std::sync::Mutex::new(HashMap::new()),
            agents: RwLock::new(lines),
            tls,
            watching: std::sync::Mutex::new(None),
        })
    }

    /// Why `server`'s agent identity was refused, if it was on the last connection attempt.
    pub fn identity_refusal(&self, server: &str) -> Option<String> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)?
            .refusal
            .as_ref()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn call_error(&self, server: &str, s: &tonic::Status) -> LinkError {
        match self.identity_refusal(server) {
            Some(why) if matches!(s.code(), Code::Unavailable | Code::Unknown) => {
                LinkError::Refused(why)
            }
            _ => link_error(s),
        }
    }

    /// An agent whose line could not be used: refused for good when the last connection
    /// found someone else's certificate at its address, unreachable otherwise.
    fn unreachable(&self, server: &str, e: &AskError) -> LinkError {
        match self.identity_refusal(server) {
            Some(why) => LinkError::Refused(why),
            None => LinkError::Unreachable(e.to_string()),
        }
    }

    fn client(&self, server: &str) -> Result<AgentClient<Channel>, LinkError> {
        let line = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .cloned()
            .ok_or_else(|| LinkError::UnknownServer(server.to_string()))?;
        line.used_ms.store(self.clock_ms(), Ordering::Relaxed);
        let mut slot = line.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = grpc_client(server, &line, self.tls.as_ref())
            .map_err(|e| LinkError::Unreachable(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn line_of(&self, server: &str) -> Option<Line> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .cloned()
    }

    /// Closes the step clients unused for [`CLIENT_IDLE`] (a call under way keeps its own
    /// handle, so its connection lives until it ends). Returns how many were closed.
    pub fn close_idle_clients(&self) -> usize {
        let now = self.clock_ms();
        let limit = u64::try_from(CLIENT_IDLE.as_millis()).unwrap_or(u64::MAX);
        let lines: Vec<Line> = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut closed = 0;
        for l in lines {
            if now.saturating_sub(l.used_ms.load(Ordering::Relaxed)) < limit {
                continue;
            }
            let dropped = l.client.lock().unwrap_or_else(|p| p.into_inner()).take();
            closed += usize::from(dropped.is_some());
        }
        closed
    }

    /// How many agents have a step client (a gRPC connection made or to be made).
    pub fn step_clients(&self) -> usize {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|l| l.client.lock().unwrap_or_else(|p| p.into_inner()).is_some())
            .count()
    }

    fn clock_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies a report from `server`'s agent.
    pub fn update(&self, server: &str, r: &pb::HealthReport) {
        let mut state = agent_state(r.state);
        let mut detail = r.detail.clone();
        if r.server_id != server {
            // A miswired address: never count someone else's health as this server's.
            state = AgentState::Failed;
            detail = format!(
                "the agent at this address reports server_id {:?}",
                r.server_id
            );
        }
        // Built before the lock is taken, and the old entry dropped after it is released:
        // readers wait only for the swap.
        let mut next = ServerHealth {
            state,
            accepting: r.accepting_connections,
            busy: r.busy,
            healthy: r.healthy,
            version: r.installed_version.clone(),
            active_connections: r.active_connections,
            detail,
            seen_ms: 0,
            serving_since_ms: None,
            disconnected: false,
            limits: r.limits.as_ref().map(limits_of),
            installed_sha256: r.installed_sha256.clone(),
        };
        let serving = state == AgentState::Serving;
        {
            let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            let last = observed.entry(server.to_owned()).or_default();
            *last = (*last).max(r.observed_at_ms);
        }
        let mut model = self.health.write();
        let now = self.clock_ms();
        next.seen_ms = now;
        next.serving_since_ms = match model.get(server) {
            Some(p) if p.state == AgentState::Serving && !p.disconnected && serving => {
                p.serving_since_ms
            }
            _ if serving => Some(now),
            _ => None,
        };
        let old = model.set(server, next);
        drop(model);
        drop(old);
    }

    /// Marks `server`'s stream broken: it stops counting as active at once.
    pub fn disconnected(&self, server: &str, why: &str) {
        let refused = self.identity_refusal(server);
        let why = refused.as_deref().unwrap_or(why);
        let mut model = self.health.write();
        let mut entry = model
            .get(server)
            .cloned()
            .unwrap_or_else(|| ServerHealth::unknown(0, why));
        entry.disconnected = true;
        entry.serving_since_ms = None;
        entry.detail = why.to_owned();
        model.set(server, entry);
    }

    /// The one timer that flips servers to lost when `lost_after` passes without a report
    /// (see [`crate::health`]), until `stop` is cancelled.
    pub async fn expire_loop(&self, lost_after: Duration, stop: &CancellationToken) {
        self.health
            .expire_loop(|| self.clock_ms(), lost_after, stop)
            .await;
    }

    async fn refresh_one(&self, server: &str) {
        let asked_ms = self.clock_ms();
        let limit = Duration::from_secs(3);
        if self.line_of(server).is_none() {
            return;
        }
        let req = LineKind::Health(pb::HealthRequest {});
        let report = |k| match k {
            pb::line_message::Kind::Report(r) => Ok(r),
            other => Err(format!("{other:?}")),
        };
        let answer = self
            .over_line(server, req, limit, limit, report)
            .await
            .map(|a| a.map_err(|e| e.to_string()));
        let answer = match answer {
            Some(a) => a,
            None => {
                let Ok(mut c) = self.client(server) else {
                    return;
                };
                c.health(with_deadline(limit, pb::HealthRequest {}))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|e| e.message().to_owned())
            }
        };
        match answer {
            Ok(r) => {
                // The stream may have delivered a report probed after this one while the call
                // was on its way back: the older probe must not undo it (a server just stopped
                // would look serving again until the next report).
                let newer_seen = self
                    .observed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(server)
                    .is_some_and(|&seen| r.observed_at_ms < seen);
                if !newer_seen {
                    self.update(server, &r);
                }
            }
            Err(e) => {
                // The health stream may have delivered a report while this call hung: that
                // report is fresher than this failure.
                let fresh = self
                    .health
                    .read()
                    .get(server)
                    .is_some_and(|h| !h.disconnected && h.seen_ms >= asked_ms);
                if !fresh {
                    self.disconnected(server, &format!("health call failed: {e}"));
                }
            }
        }
    }

    /// Starts one watch task per agent on `tasks`, and the task that closes idle step
    /// clients, until `stop` is cancelled. A report line silent for `line_idle` is dropped and
    /// dialled again (see [`line_idle`]).
    pub fn watch_all(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        line_idle: Duration,
    ) {
        *self.watching.lock().unwrap_or_else(|p| p.into_inner()) = Some(Watching {
            tasks: tasks.clone(),
            stop: stop.clone(),
            me: Arc::downgrade(self),
            line_idle,
        });
        let (me, sweep_stop) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = sweep_stop.cancelled() => return,
                    _ = tokio::time::sleep(CLIENT_IDLE / 4) => {}
                }
                let closed = me.close_idle_clients();
                if closed > 0 {
                    tracing::debug!(closed, "idle agent step connections closed");
                }
            }
        });
        let lines: Vec<(String, CancellationToken)> = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(s, l)| (s.clone(), l.stop.clone()))
            .collect();
        for (server, line_stop) in lines {
            self.spawn_watch(tasks, stop, server, line_stop, line_idle);
        }
    }

    fn spawn_watch(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        server: String,
        line_stop: CancellationToken,
        line_idle: Duration,
    ) {
        let (me, stop) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = line_stop.cancelled() => {}
                _ = me.watch_one(&server, &stop, line_idle) => {}
            }
        });
    }

    /// See [`AgentLink::set_agents`].
    fn update_agents(&self, agents: &[(String, String)]) {
        let mut started = Vec::new();
        {
            let mut lines = self.agents.write().unwrap_or_else(|p| p.into_inner());
            let wanted: HashMap<&str, &str> = agents
                .iter()
                .map(|(s, a)| (s.as_str(), a.as_str()))
                .collect();
            lines.retain(|server, l| {
                let keep = wanted.get(server.as_str()) == Some(&l.address.as_str());
                if !keep {
                    l.stop.cancel();
                }
                keep
            });
            for (server, address) in agents {
                if lines.contains_key(server) {
                    continue;
                }
                match line(server, address, self.tls.as_ref()) {
                    Ok(l) => {
                        tracing::info!(%server, %address, "agent line added");
                        started.push((server.clone(), l.stop.clone()));
                        lines.insert(server.clone(), l);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot make an agent line"),
                }
            }
        }
        // A departed server's health is forgotten: it left the fleet (a server whose address
        // changed keeps its entry; its new line reports into it).
        let gone: Vec<String> = {
            let m = self.health.read();
            m.snapshot()
                .into_keys()
                .filter(|s| !agents.iter().any(|(a, _)| a == s))
                .collect()
        };
        if !gone.is_empty() {
            let dropped: Vec<_> = {
                let mut m = self.health.write();
                gone.iter().filter_map(|s| m.forget(s)).collect()
            };
            let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
            for s in &gone {
                observed.remove(s);
            }
            drop(observed);
            drop(dropped);
        }
        let watching = self
            .watching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(w) = watching {
            if let Some(me) = w.me.upgrade() {
                for (server, line_stop) in started {
                    me.spawn_watch(&w.tasks, &w.stop, server, line_stop, w.line_idle);
                }
            }
        }
    }

    async fn watch_one(&self, server: &str, stop: &CancellationToken, line_idle: Duration) {
        let mut backoff = Duration::from_millis(100);
        if let (Some(_), Some(line)) = (self.tls.as_ref(), self.line_of(server)) {
            // From now on this task dials the line: requests wait for it rather than use gRPC.
            line.queue.set_grpc_only(false);
        }
        loop {
            let Some(line) = self.line_of(server) else {
                return;
            };
            let session = async {
                match (self.tls.as_ref(), line.refusal.as_ref()) {
                    (Some(tls), Some(refusal)) => {
                        match self
                            .line_session(server, &line, tls, refusal, line_idle)
                            .await
                        {
                            Some(ended) => ended,
                            // It does not speak the line: the gRPC Watch, until that ends
                            // (boxed: the rare case need not size every agent's task).
                            None => Box::pin(self.watch_session(server)).await,
                        }
                    }
                    _ => Box::pin(self.watch_session(server)).await,
                }
            };
            let ended = tokio::select! {
                _ = stop.cancelled() => return,
                ended = session => ended,
            };
            tracing::debug!(%server, why = %ended.why, "agent health stream lost; reconnecting");
            if ended.heard {
                // It worked for a while: start the backoff afresh.
                backoff = Duration::from_millis(100);
            }
            self.disconnected(server, &ended.why);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Asks `server`'s agent over its report line: `None` when requests to it use gRPC (the
    /// caller makes the gRPC call), else what `expect` takes from the answer, or why there is
    /// none (a refusal as the gRPC call would map it; an answer of another kind, which
    /// `expect` shows; unreachable, or refused when someone else's certificate answered at its
    /// address).
    async fn over_line<T>(
        &self,
        server: &str,
        req: LineKind,
        up_wait: Duration,
        limit: Duration,
        expect: impl FnOnce(pb::line_message::Kind) -> Result<T, String>,
    ) -> Option<Result<T, LinkError>> {
        let Some(line) = self.line_of(server) else {
            return Some(Err(LinkError::UnknownServer(server.to_string())));
        };
        Some(match line.queue.ask(req, up_wait, limit).await {
            Ok(pb::LineMessage {
                kind: Some(pb::line_message::Kind::Error(e)),
                ..
            }) => Err(self.call_error(server, &rollgate_proto::line::status_of(e))),
            Ok(pb::LineMessage {
                kind: Some(kind), ..
            }) => expect(kind).map_err(|other| {
                LinkError::Unreachable(format!("unexpected answer on the report line: {other}"))
            }),
            Ok(other) => Err(LinkError::Unreachable(format!(
                "unexpected answer on the report line: {other:?}"
            ))),
            Err(AskError::NotUp) => return None,
            Err(e @ AskError::TimedOut(_)) => Err(LinkError::TimedOut(e.to_string())),
            Err(e @ (AskError::Lost | AskError::Down(_))) => Err(self.unreachable(server, &e)),
        })
    }

    /// A step or an operation's status: over the report line when it is up (or comes up
    /// within a connect's time), else over gRPC (an agent that does not speak the line).
    async fn call_step(
        &self,
        server: &str,
        req: LineKind,
        timeout: Duration,
    ) -> Result<OpReply, LinkError> {
        let result = |k| match k {
            pb::line_message::Kind::Result(r) => Ok(op_reply(r)),
            other => Err(format!("{other:?}")),
        };
        if let Some(answer) = self
            .over_line(server, req.clone(), CONNECT_WAIT, timeout, result)
            .await
        {
            return answer;
        }
        let mut c = self.client(server)?;
        let t = timeout;
        let r = match req {
            LineKind::InstallPatch(m) => c.install_patch(with_deadline(t, m)).await,
            LineKind::Rollback(m) => c.rollback(with_deadline(t, m)).await,
            LineKind::Drain(m) => c.drain(with_deadline(t, m)).await,
            LineKind::Stop(m) => c.stop(with_deadline(t, m)).await,
            LineKind::Restart(m) => c.restart(with_deadline(t, m)).await,
            LineKind::Verify(m) => c.verify(with_deadline(t, m)).await,
            LineKind::OperationStatus(m) => c.operation_status(with_deadline(t, m)).await,
            LineKind::Health(_) | LineKind::Fence(_) => {
                return Err(LinkError::Refused(
                    "not a step: health and fence have calls of their own".into(),
                ))
            }
        };
        r.map(|r| op_reply(r.into_inner()))
            .map_err(|s| self.call_error(server, &s))
    }

    /// One report-line session with `server`'s agent; `None` when the agent does not speak the
    /// line (it refused the protocol, or chose none).
    async fn line_session(
        &self,
        server: &str,
        line: &Line,
        tls: &AgentTls,
        refusal: &Refusal,
        idle: Duration,
    ) -> Option<report_line::Ended> {
        // The handshake and the TLS session are boxed: they are over 1 KiB each, and in an
        // async fn's state every local that lives across an await keeps its room for the
        // whole call, that is for the line's whole life (one task per agent).
        let dial = Box::pin(tls.dial_line(server, &line.address, Arc::clone(refusal)));
        let stream = match dial.await {
            Ok(s) => Box::new(s),
            Err(e) if rollgate_common::peer_tls::protocol_refused(&e) => {
                line.queue.set_grpc_only(true);
                return None;
            }
            Err(e) => {
                return Some(report_line::Ended {
                    heard: false,
                    why: format!("report line failed: cannot connect: {e}"),
                })
            }
        };
        if stream.get_ref().1.alpn_protocol() != Some(rollgate_proto::line::ALPN) {
            line.queue.set_grpc_only(true);
            return None;
        }
        Some(report_line::session(stream, &line.queue, idle, |r| self.update(server, &r)).await)
    }

    /// One gRPC Watch session with `server`'s agent.
    async fn watch_session(&self, server: &str) -> report_line::Ended {
        let mut heard = false;
        let attempt = async {
            let mut client = self
                .client(server)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
            while let Some(r) = stream.message().await? {
                heard = true;
                self.update(server, &r);
            }
            Ok::<(), tonic::Status>(())
        };
        let why = match attempt.await {
            Ok(()) => "health stream ended".to_owned(),
            Err(e) => format!("health stream failed: {}", e.message()),
        };
        report_line::Ended { heard, why }
    }
}

#[tonic::async_trait]
impl AgentLink for Inventory {
    fn set_agents(&self, agents: &[(String, String)]) {
        self.update_agents(agents);
    }

    fn channels(&self) -> crate::link::Channels {
        let lines = self.agents.read().unwrap_or_else(|p| p.into_inner());
        let mut c = crate::link::Channels::default();
        for l in lines.values() {
            if l.queue.is_up() {
                c.line += 1;
            } else if l.queue.is_grpc_only() {
                c.grpc += 1;
            }
        }
        c
    }

    fn servers(&self) -> Vec<String> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn health(&self) -> HashMap<String, ServerHealth> {
        self.health.read().snapshot()
    }

    fn health_of(&self, servers: &[&String]) -> HashMap<String, ServerHealth> {
        let model = self.health.read();
        servers
            .iter()
            .filter_map(|s| model.get(s).map(|h| ((*s).clone(), h.clone())))
            .collect()
    }

    fn readiness(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
        rows: bool,
    ) -> PoolReadiness {
        self.health
            .readiness(spec, clocks, going_down, operation_running, rows)
    }

    fn now_ms(&self) -> u64 {
        self.clock_ms()
    }

    async fn refresh(&self, servers: Vec<String>) {
        futures_util::future::join_all(servers.iter().map(|s| self.refresh_one(s))).await;
    }

    async fn run(
        &self,
        server: &str,
        op_id: &str,
        epoch: Epoch,
        command: &AgentCommand,
        timeout: Duration,
    ) -> Result<OpReply, LinkError> {
        let header = pb::OperationHeader {
            operation_id: op_id.to_string(),
            epoch: epoch.get(),
        };
        self.call_step(server, request_of(command, header), timeout)
            .await
    }

    async fn operation(&self, server: &str, op_id: &str) -> Result<OpReply, LinkError> {
        let req = LineKind::OperationStatus(pb::OperationStatusRequest {
            operation_id: op_id.to_string(),
        });
        self.call_step(server, req, Duration::from_secs(5)).await
    }

    async fn fence(&self, server: &str, epoch: Epoch) -> Result<(), LinkError> {
        let limit = Duration::from_secs(2);
        let req = LineKind::Fence(pb::FenceRequest { epoch: epoch.get() });
        let fenced = |k| match k {
            pb::line_message::Kind::Fenced(_) => Ok(()),
            other => Err(format!("{other:?}")),
        };
        if let Some(answer) = self.over_line(server, req, limit, limit, fenced).await {
            return answer;
        }
        let mut c = self.client(server)?;
        c.fence(with_deadline(
            limit,
            pb::FenceRequest { epoch: epoch.get() },
        ))
        .await
        .map(|_| ())
        .map_err(|s| self.call_error(server, &s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_epoch_is_read_from_the_status_detail_not_the_text() {
        let detail = pb::AgentErrorDetail {
            reason: pb::AgentErrorReason::StaleEpoch as i32,
            current_epoch: 9,
            ..Default::default()
        };
        // The text says nothing about epochs: only the detail does.
        let s = detail.to_status(Code::FailedPrecondition, "refused");
        assert_eq!(
            link_error(&s),
            LinkError::StaleEpoch {
                current: 9,
                message: "refused".into()
            }
        );
        // And a text that looks like it, without the detail, is not taken for it.
        let s = tonic::Status::failed_precondition("stale epoch 3: this agent has accepted 7");
        assert!(matches!(link_error(&s), LinkError::Refused(_)));
    }

    #[test]
    fn transport_failures_are_retryable_and_refusals_are_not() {
        assert!(link_error(&tonic::Status::unavailable("connect refused")).is_retryable());
        assert!(link_error(&tonic::Status::deadline_exceeded("slow")).is_unreachable());
        let busy = pb::AgentErrorDetail {
            reason: pb::AgentErrorReason::Busy as i32,
            running_operation_id: "x".into(),
            retryable: true,
            ..Default::default()
        }
        .to_status(Code::Aborted, "busy");
        assert!(link_error(&busy).is_retryable());
        let pre = pb::AgentErrorDetail {
            reason: pb::AgentErrorReason::Precondition as i32,
            ..Default::default()
        }
        .to_status(Code::FailedPrecondition, "serving");
        assert!(!link_error(&pre).is_retryable());
    }
}
#[cfg(test)]
mod task_size {
    use super::*;

    /// Every coordinator holds one watch task per agent for life: its future's size is paid
    /// 10,000 times (B3). A TLS session or handshake held inline in it (1.1 and 1.6 KiB here)
    /// made it 4.2 KiB; they are boxed, the session only while it is up.
    #[tokio::test]
    async fn an_agents_watch_task_stays_small() {
        let inv =
            Inventory::new(&[("fe-1".into(), "127.0.0.1:1".into())], None).expect("inventory");
        let stop = CancellationToken::new();
        let watch = inv.watch_one("fe-1", &stop, Duration::from_secs(15));
        assert!(
            std::mem::size_of_val(&watch) <= 1536,
            "the watch task's future is {} bytes",
            std::mem::size_of_val(&watch)
        );

        let dir = tempfile::tempdir().expect("temp dir");
        let ca = rollgate_common::pki::Ca::generate("test CA").expect("ca");
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.cert_pem()).expect("ca file");
        let role =
            rollgate_common::tls::Role::new(rollgate_common::tls::RoleKind::Coordinator, "c1");
        let (cert, key) = ca
            .issue(&role, &[])
            .expect("certificate")
            .write(dir.path(), "c1")
            .expect("certificate files");
        let files = rollgate_common::tls::TlsFiles {
            ca: ca_path,
            cert,
            key,
        };
        let tls = AgentTls::from_files(&files).expect("tls");
        let line = inv.line_of("fe-1").expect("line");
        let refusal = Refusal::default();
        let session = inv.line_session("fe-1", &line, &tls, &refusal, Duration::from_secs(15));
        assert!(
            std::mem::size_of_val(&session) <= 1024,
            "the line session's future is {} bytes",
            std::mem::size_of_val(&session)
        );
    }
}
