//! The live inventory: one health stream per agent, kept in memory (no store write per
//! report), and [`AgentLink`] over tonic: the calls the leader makes to agents, with the
//! agents' typed refusals (status details) turned into [`LinkError`]s.

use crate::agent_tls::{AgentTls, Refusal};
use crate::config::PoolSpec;
use crate::health::SharedHealth;
use crate::link::{AgentCommand, AgentLimits, AgentLink, LinkError, OpReply, OpState};
use crate::readiness::{AgentState, Clocks, PoolReadiness, ServerHealth};
use rollgate_common::Epoch;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_client::AgentClient;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

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
}

/// The line to one agent.
#[derive(Debug, Clone)]
struct Line {
    address: String,
    client: AgentClient<Channel>,
    /// Why its identity was refused (TLS only).
    refusal: Option<Refusal>,
    /// Stops its health stream.
    stop: CancellationToken,
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

/// A lazily-connecting line to `server`'s agent at `address`. With `tls`, every connection
/// checks that the agent's certificate names that server.
fn line(server: &str, address: &str, tls: Option<&AgentTls>) -> Result<Line, ClientError> {
    let err = |message: String| ClientError {
        server: server.to_owned(),
        address: address.to_owned(),
        message,
    };
    // The scheme only labels requests: with TLS the connector below does the handshake.
    let ep = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let (channel, refusal) = match tls {
        Some(t) => {
            let refusal = Refusal::default();
            (
                ep.connect_with_connector_lazy(t.connector(server, Arc::clone(&refusal))),
                Some(refusal),
            )
        }
        None => (ep.connect_lazy(), None),
    };
    Ok(Line {
        address: address.to_owned(),
        client: AgentClient::new(channel).max_decoding_message_size(1 << 20),
        refusal,
        stop: CancellationToken::new(),
    })
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

    fn client(&self, server: &str) -> Result<AgentClient<Channel>, LinkError> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(server)
            .map(|l| l.client.clone())
            .ok_or_else(|| LinkError::UnknownServer(server.to_string()))
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
        let Ok(mut c) = self.client(server) else {
            return;
        };
        let asked_ms = self.clock_ms();
        match c
            .health(with_deadline(Duration::from_secs(3), pb::HealthRequest {}))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
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
                    self.disconnected(server, &format!("health call failed: {}", e.message()));
                }
            }
        }
    }

    /// Starts one watch task per agent on `tasks`, until `stop` is cancelled.
    pub fn watch_all(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        *self.watching.lock().unwrap_or_else(|p| p.into_inner()) = Some(Watching {
            tasks: tasks.clone(),
            stop: stop.clone(),
            me: Arc::downgrade(self),
        });
        let lines: Vec<(String, CancellationToken)> = self
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(s, l)| (s.clone(), l.stop.clone()))
            .collect();
        for (server, line_stop) in lines {
            self.spawn_watch(tasks, stop, server, line_stop);
        }
    }

    fn spawn_watch(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
        server: String,
        line_stop: CancellationToken,
    ) {
        let (me, stop) = (Arc::clone(self), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = line_stop.cancelled() => {}
                _ = me.watch_one(&server, &stop) => {}
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
                    me.spawn_watch(&w.tasks, &w.stop, server, line_stop);
                }
            }
        }
    }

    async fn watch_one(&self, server: &str, stop: &CancellationToken) {
        let Ok(mut client) = self.client(server) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut connected = false;
            let attempt = async {
                let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
                while let Some(r) = stream.message().await? {
                    connected = true;
                    self.update(server, &r);
                }
                Ok::<(), tonic::Status>(())
            };
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                r = attempt => match r {
                    Ok(()) => "health stream ended".to_owned(),
                    Err(e) => format!("health stream failed: {}", e.message()),
                },
            };
            tracing::debug!(%server, %why, "agent health stream lost; reconnecting");
            if connected {
                // It worked for a while: start the backoff afresh.
                backoff = Duration::from_millis(100);
            }
            self.disconnected(server, &why);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[tonic::async_trait]
impl AgentLink for Inventory {
    fn set_agents(&self, agents: &[(String, String)]) {
        self.update_agents(agents);
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
        let mut c = self.client(server)?;
        let header = Some(pb::OperationHeader {
            operation_id: op_id.to_string(),
            epoch: epoch.get(),
        });
        let t = timeout;
        let r = match command {
            AgentCommand::PrepareInstall {
                artifact,
                sha256,
                version,
            }
            | AgentCommand::Install {
                artifact,
                sha256,
                version,
            } => {
                let prepare_only = matches!(command, AgentCommand::PrepareInstall { .. });
                c.install_patch(with_deadline(
                    t,
                    pb::InstallPatchRequest {
                        header,
                        artifact: artifact.clone(),
                        sha256: sha256.clone(),
                        version: version.clone(),
                        timeout_ms: 0,
                        prepare_only,
                    },
                ))
                .await
            }
            AgentCommand::PrepareRollback {
                from_version,
                fallback,
            }
            | AgentCommand::Rollback {
                from_version,
                fallback,
            } => {
                let prepare_only = matches!(command, AgentCommand::PrepareRollback { .. });
                let (fallback_artifact, fallback_sha256) = fallback
                    .as_ref()
                    .map(|f| (f.artifact.clone(), f.sha256.clone()))
                    .unwrap_or_default();
                c.rollback(with_deadline(
                    t,
                    pb::RollbackRequest {
                        header,
                        timeout_ms: 0,
                        from_version: from_version.clone(),
                        prepare_only,
                        fallback_artifact,
                        fallback_sha256,
                    },
                ))
                .await
            }
            AgentCommand::Drain { timeout } => {
                c.drain(with_deadline(
                    t,
                    pb::DrainRequest {
                        header,
                        // 0 would mean the agent's default: a drain of zero waits 1 ms.
                        timeout_ms: ms(*timeout).max(1),
                        on_timeout: pb::DrainTimeoutAction::Fail as i32,
                    },
                ))
                .await
            }
            AgentCommand::Stop => c.stop(with_deadline(t, pb::StopRequest { header })).await,
            AgentCommand::Restart { drain_first } => {
                c.restart(with_deadline(
                    t,
                    pb::RestartRequest {
                        header,
                        timeout_ms: 0,
                        drain_if_accepting: drain_first.is_some(),
                        drain_timeout_ms: drain_first.map_or(0, |d| ms(d).max(1)),
                    },
                ))
                .await
            }
            AgentCommand::Verify { stable, timeout } => {
                // Always set: an explicit zero means "one good probe", not "the default".
                c.verify(with_deadline(
                    t,
                    pb::VerifyRequest {
                        header,
                        stable_ms: Some(ms(*stable)),
                        timeout_ms: ms(*timeout).max(1),
                    },
                ))
                .await
            }
        };
        r.map(|r| op_reply(r.into_inner()))
            .map_err(|s| self.call_error(server, &s))
    }

    async fn operation(&self, server: &str, op_id: &str) -> Result<OpReply, LinkError> {
        let mut c = self.client(server)?;
        c.operation_status(with_deadline(
            Duration::from_secs(5),
            pb::OperationStatusRequest {
                operation_id: op_id.to_string(),
            },
        ))
        .await
        .map(|r| op_reply(r.into_inner()))
        .map_err(|s| self.call_error(server, &s))
    }

    async fn fence(&self, server: &str, epoch: Epoch) -> Result<(), LinkError> {
        let mut c = self.client(server)?;
        c.fence(with_deadline(
            Duration::from_secs(2),
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
