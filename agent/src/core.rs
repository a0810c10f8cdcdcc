//! The agent's domain logic, free of gRPC: admitting fenced operations, running them against
//! the service, journaling them, and probing health.
//!
//! Admission order matters and is the heart of fencing: validate → refuse an older epoch →
//! answer a known operation id from the journal → refuse a second concurrent operation → check
//! the service is in a state where the step is safe → store a higher epoch durably → journal
//! `begin` → act. Nothing is changed before the last three steps, so a refused call changes
//! nothing.
//!
//! A raised epoch never stops a running operation: a new leader that repeats the step it found
//! under way (same operation id, newer epoch) *adopts* it — its epoch is stored, the adoption
//! journaled, and it waits for the same run's result. Failing the step instead would leave the
//! service half-drained for the new leader to clean up, for no gain: the work is the same.

use crate::artifact;
use crate::config::AgentConfig;
use crate::durable::{Phase, ServiceRecord, StateDir};
use crate::error::AgentError;
use crate::hooks;
use crate::journal::{Journal, OpKind, OpRecord, OpState};
use crate::probe;
use crate::wait;
use rollgate_common::time::now_ms;
use rollgate_common::Epoch;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The identity and fencing part of every state-changing call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpHeader {
    /// The caller's operation id.
    pub id: String,
    /// The caller's epoch.
    pub epoch: Epoch,
}

impl OpHeader {
    /// Checks an id and epoch from the wire.
    pub fn new(id: &str, epoch: u64) -> Result<OpHeader, AgentError> {
        use rollgate_common::config::MAX_OPERATION_ID_LEN;
        if id.is_empty()
            || id.len() > MAX_OPERATION_ID_LEN
            || !id.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(AgentError::InvalidArgument(format!(
                "operation id {} must be 1-{MAX_OPERATION_ID_LEN} printable ASCII characters without spaces",
                rollgate_common::quote::quoted(id)
            )));
        }
        if epoch == 0 {
            return Err(AgentError::InvalidArgument(
                "epoch 0 is not a leader epoch: state-changing calls need the caller's epoch"
                    .into(),
            ));
        }
        Ok(OpHeader {
            id: id.to_owned(),
            epoch: Epoch(epoch),
        })
    }
}

/// What a drain does when connections are still open at its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDrainTimeout {
    /// Report failure and leave the service draining.
    Fail,
    /// Stop the service anyway.
    Force,
}

/// A state-changing step with its parameters (already validated).
#[derive(Debug, Clone)]
pub enum OpBody {
    /// Graceful drain, then stop.
    Drain {
        /// How long to wait for connections to close.
        timeout: Duration,
        /// What to do when they do not.
        on_timeout: OnDrainTimeout,
    },
    /// Immediate stop.
    Stop,
    /// Install a verified artifact.
    Install {
        /// The verified file in the artifact store.
        artifact: PathBuf,
        /// Its sha256.
        sha256: String,
        /// The version it installs.
        version: String,
        /// Limit for the install command.
        timeout: Duration,
    },
    /// Reinstall the previous version.
    Rollback {
        /// Limit for the install command.
        timeout: Duration,
        /// Only if this version is installed (empty: whatever is installed).
        from_version: String,
        /// The sha256 of the caller's fallback artifact of the previous version, already
        /// fetched and verified into the cache; used only when the previous version's own
        /// artifact is not cached.
        fallback_sha256: Option<String>,
    },
    /// Start or restart, then wait until it accepts connections.
    Restart {
        /// How long to wait.
        timeout: Duration,
        /// When set and the service accepts connections at the start: drain it first, waiting
        /// this long for its connections to close, instead of cutting them.
        drain_first: Option<Duration>,
    },
    /// Check it stays good for `stable`.
    Verify {
        /// How long it must hold.
        stable: Duration,
        /// How long to try.
        timeout: Duration,
    },
}

impl OpBody {
    /// The kind recorded in the journal.
    pub fn kind(&self) -> OpKind {
        match self {
            OpBody::Drain { .. } => OpKind::Drain,
            OpBody::Stop => OpKind::Stop,
            OpBody::Install { .. } => OpKind::Install,
            OpBody::Rollback { .. } => OpKind::Rollback,
            OpBody::Restart { .. } => OpKind::Restart,
            OpBody::Verify { .. } => OpKind::Verify,
        }
    }
}

/// The service's state as reported to coordinators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Accepting connections and healthy.
    Serving,
    /// A graceful drain is under way.
    Draining,
    /// Drained and stopped.
    Drained,
    /// Stopped.
    Stopped,
    /// An install is running.
    Installing,
    /// Starting.
    Starting,
    /// Should be serving but is not, or the last step left it broken.
    Failed,
}

impl ServiceState {
    /// The lowercase name (metrics labels, logs).
    pub fn name(self) -> &'static str {
        match self {
            ServiceState::Serving => "serving",
            ServiceState::Draining => "draining",
            ServiceState::Drained => "drained",
            ServiceState::Stopped => "stopped",
            ServiceState::Installing => "installing",
            ServiceState::Starting => "starting",
            ServiceState::Failed => "failed",
        }
    }
}

/// One health observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// The service's state.
    pub state: ServiceState,
    /// A TCP connect to every port succeeded.
    pub accepting: bool,
    /// The busy probe said busy.
    pub busy: bool,
    /// The HTTP health probe passed (or there is none).
    pub healthy: bool,
    /// Established connections on the service's ports.
    pub active_connections: u32,
    /// The installed version.
    pub version: String,
    /// The sha256 of the installed artifact (empty: installed outside rollgate).
    pub installed_sha256: String,
    /// The version a rollback returns to (empty: none known).
    pub previous_version: String,
    /// The highest epoch accepted.
    pub epoch: Epoch,
    /// When this was observed (unix ms).
    pub observed_at_ms: u64,
    /// Why the state is not plainly serving.
    pub detail: String,
    /// The last operation.
    pub last_op: Option<OpRecord>,
}

struct Running {
    id: String,
    kind: OpKind,
    done: watch::Receiver<Option<OpRecord>>,
}

struct Inner {
    epoch: Epoch,
    journal: Journal,
    service: ServiceRecord,
    /// What the state directory holds, as last loaded or stored.
    stored_service: ServiceRecord,
    running: Option<Running>,
}

impl Inner {
    /// Stores the service record durably, unless the state directory holds it already: a
    /// verify or a moot rollback changes nothing, and a store is two fsyncs on the critical
    /// path of the step that ends.
    fn store_service(&mut self, dir: &StateDir) -> std::io::Result<()> {
        if self.service == self.stored_service {
            return Ok(());
        }
        dir.store_service(&self.service)?;
        self.stored_service = self.service.clone();
        Ok(())
    }
}

/// The agent: config, durable state, the running operation and the health feed.
pub struct AgentCore {
    /// The configuration it runs with.
    pub cfg: AgentConfig,
    dir: StateDir,
    fetcher: artifact::Fetcher,
    ports: HashSet<u16>,
    /// The kernel boot id at start.
    pub boot_id: String,
    initial_version: String,
    // A std mutex: critical sections are short and never held across an await; the durable
    // writes inside them (fsync of a small file) are what makes admission atomic.
    inner: Mutex<Inner>,
    health_tx: watch::Sender<Health>,
    /// The service's phase as soon as it changes (before any probe): a load balancer asking
    /// grpc.health.v1 sees NOT_SERVING from the moment a drain is admitted.
    phase_tx: watch::Sender<Phase>,
    poke: Notify,
    /// The service's client connections as last counted (by a probe or a step's wait): what a
    /// probe that does not count again reports.
    connections: AtomicU32,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for AgentCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCore")
            .field("server_id", &self.cfg.server_id)
            .finish_non_exhaustive()
    }
}

/// Whether a probe counts the service's connections again (a walk of the kernel's whole TCP
/// table: ~0.2 ms on a quiet 24 GiB server, more under load) or reports the last count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Count them now.
    Now,
    /// Report the last count.
    Last,
}

/// How an operation's work ended.
struct Outcome {
    ok: bool,
    message: String,
    output: String,
    phase: Phase,
}

impl AgentCore {
    /// Opens the state directory, replays the journal and starts nothing yet.
    pub async fn open(
        cfg: AgentConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<AgentCore>, AgentError> {
        let storage = |e: std::io::Error| AgentError::Storage(e.to_string());
        let dir = StateDir::open(&cfg.state_dir)?;
        let epoch = dir.load_epoch().map_err(storage)?;
        let journal = Journal::open(&dir.journal_path())?;
        let service = dir.load_service().map_err(storage)?;
        let svc = &cfg.service;
        let fetcher = artifact::Fetcher::new(
            dir.artifacts(),
            artifact::FetchPolicy {
                max_bytes: svc.max_artifact_bytes,
                timeout: svc.fetch_timeout,
                connect_timeout: svc.fetch_connect_timeout,
                idle_timeout: svc.fetch_idle_timeout,
                local_dirs: svc.artifact_dirs.clone(),
            },
        )
        .map_err(|e| AgentError::Storage(format!("cannot build the artifact HTTP client: {e}")))?;
        let initial_version = if cfg.service.version_command.is_empty() {
            String::new()
        } else {
            match hooks::run(&cfg.service.version_command, &[], cfg.service.hook_timeout).await {
                Ok(o) if o.success() => o.output.trim().to_owned(),
                Ok(o) => {
                    tracing::warn!(detail = %o.describe("version", cfg.service.hook_timeout), "version command failed");
                    String::new()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "version command failed");
                    String::new()
                }
            }
        };
        let ports = cfg.service.ports.iter().copied().collect();
        let initial = Health {
            state: ServiceState::Starting,
            accepting: false,
            busy: false,
            healthy: false,
            active_connections: 0,
            version: if service.installed_version.is_empty() {
                initial_version.clone()
            } else {
                service.installed_version.clone()
            },
            installed_sha256: service.installed_sha256.clone(),
            previous_version: service.previous_version.clone(),
            epoch,
            observed_at_ms: now_ms(),
            detail: "not probed yet".into(),
            last_op: journal.last().cloned(),
        };
        let (health_tx, _) = watch::channel(initial);
        let (phase_tx, _) = watch::channel(service.phase);
        Ok(Arc::new(AgentCore {
            cfg,
            dir,
            fetcher,
            ports,
            boot_id: probe::boot_id(),
            initial_version,
            inner: Mutex::new(Inner {
                epoch,
                journal,
                stored_service: service.clone(),
                service,
                running: None,
            }),
            health_tx,
            phase_tx,
            poke: Notify::new(),
            connections: AtomicU32::new(0),
            tasks: TaskTracker::new(),
            shutdown,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-update; the data is still the last durable state
        // plus in-memory mirrors of it, so carry on with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The highest epoch accepted.
    pub fn epoch(&self) -> Epoch {
        self.lock().epoch
    }

    /// Raises the epoch without acting (a new leader fencing off older ones).
    pub fn fence(&self, epoch: Epoch) -> Result<Epoch, AgentError> {
        if epoch == Epoch::NONE {
            return Err(AgentError::InvalidArgument(
                "epoch 0 is not a leader epoch".into(),
            ));
        }
        let mut inner = self.lock();
        if epoch < inner.epoch {
            return Err(AgentError::StaleEpoch {
                got: epoch,
                current: inner.epoch,
            });
        }
        if epoch > inner.epoch {
            self.dir
                .store_epoch(epoch)
                .map_err(|e| AgentError::Storage(e.to_string()))?;
            inner.epoch = epoch;
            tracing::info!(
                epoch = epoch.get(),
                "fenced: older epochs are refused from now on"
            );
        }
        drop(inner);
        self.poke.notify_one();
        Ok(epoch)
    }

    /// The journal's record of an operation.
    pub fn operation(&self, id: &str) -> Result<OpRecord, AgentError> {
        self.lock()
            .journal
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::UnknownOperation(id.to_owned()))
    }

    /// Every operation in the journal (for tests and tools that check exactly-once).
    pub fn operations(&self) -> Vec<OpRecord> {
        self.lock().journal.records().cloned().collect()
    }

    /// Answers a repeated id from the journal, if it is there: `Ok(Some)` when done,
    /// `Ok(None)` when the call should go on. Read-only: used before any slow preparation.
    pub fn precheck(&self, header: &OpHeader, kind: OpKind) -> Result<Option<Reply>, AgentError> {
        let inner = self.lock();
        self.check_epoch(&inner, header)?;
        match inner.journal.get(&header.id) {
            Some(rec) if rec.kind != kind => Err(AgentError::KindMismatch {
                id: header.id.clone(),
                recorded: rec.kind.name(),
                requested: kind.name(),
            }),
            Some(rec) if matches!(rec.state, OpState::Succeeded | OpState::Failed) => {
                Ok(Some(replayed(rec)))
            }
            _ => Ok(None),
        }
    }

    fn check_epoch(&self, inner: &Inner, header: &OpHeader) -> Result<(), AgentError> {
        if header.epoch < inner.epoch {
            return Err(AgentError::StaleEpoch {
                got: header.epoch,
                current: inner.epoch,
            });
        }
        Ok(())
    }

    /// Runs a state-changing operation (or answers it from the journal) and waits for its end.
    /// The work runs on its own task, so a caller that goes away does not cut it short.
    pub async fn execute(
        self: &Arc<Self>,
        header: OpHeader,
        body: OpBody,
    ) -> Result<Reply, AgentError> {
        let kind = body.kind();
        // Adopting a running install or rollback needs no check: it changes nothing.
        if matches!(kind, OpKind::Install | OpKind::Rollback)
            && !self.is_running(&header.id)
            && probe::accepting(
                &self.cfg.service.probe_host,
                &self.cfg.service.ports,
                self.cfg.service.probe_timeout,
            )
            .await
            && self.precheck(&header, kind)?.is_none()
        {
            return Err(AgentError::Precondition(format!(
                "the service still accepts connections on port(s) {:?}: drain or stop it before {}",
                self.cfg.service.ports,
                kind.name()
            )));
        }
        let mut done = match self.admit(&header, &body)? {
            Admission::Replay(rec) => return Ok(rec),
            Admission::Attach(rx) => rx,
            Admission::Started(rec, tx, rx) => {
                let me = Arc::clone(self);
                self.tasks.spawn(async move {
                    let outcome = me.work(&rec, body).await;
                    let finished = me.finish(rec, outcome);
                    tx.send_replace(Some(finished));
                    me.poke.notify_one();
                });
                rx
            }
        };
        loop {
            if let Some(record) = done.borrow_and_update().clone() {
                return Ok(Reply {
                    record,
                    replayed: false,
                });
            }
            if done.changed().await.is_err() {
                // The work task ended without a result: only possible if it was dropped at
                // shutdown. The journal keeps it as interrupted.
                return Err(AgentError::ShuttingDown);
            }
        }
    }

    fn admit(&self, header: &OpHeader, body: &OpBody) -> Result<Admission, AgentError> {
        if self.shutdown.is_cancelled() {
            return Err(AgentError::ShuttingDown);
        }
        let kind = body.kind();
        let mut inner = self.lock();
        self.check_epoch(&inner, header)?;
        if let Some(rec) = inner.journal.get(&header.id) {
            if rec.kind != kind {
                return Err(AgentError::KindMismatch {
                    id: header.id.clone(),
                    recorded: rec.kind.name(),
                    requested: kind.name(),
                });
            }
            match rec.state {
                OpState::Succeeded | OpState::Failed => {
                    return Ok(Admission::Replay(replayed(rec)))
                }
                OpState::Running => {
                    let journaled_epoch = rec.epoch;
                    let running = inner.running.as_ref().filter(|r| r.id == header.id);
                    if let Some(done) = running.map(|r| r.done.clone()) {
                        if header.epoch > journaled_epoch {
                            self.adopt(&mut inner, header)?;
                        }
                        return Ok(Admission::Attach(done));
                    }
                }
                OpState::Interrupted => {}
            }
        }
        if let Some(r) = &inner.running {
            return Err(AgentError::Busy {
                running: r.id.clone(),
                kind: r.kind.name(),
            });
        }
        self.check_phase(&inner.service, body)?;
        let storage = |e: std::io::Error| AgentError::Storage(e.to_string());
        if header.epoch > inner.epoch {
            self.dir.store_epoch(header.epoch).map_err(storage)?;
            inner.epoch = header.epoch;
        }
        let rec = inner
            .journal
            .begin(&header.id, kind, header.epoch, now_ms())?;
        let phase = match body {
            // A rollback with nothing to do must leave the phase as it found it.
            OpBody::Rollback { from_version, .. }
                if matches!(
                    self.rollback_source(&inner.service, from_version),
                    Ok(RollbackSource::Moot(_))
                ) =>
            {
                None
            }
            _ => match kind {
                OpKind::Drain => Some(Phase::Draining),
                OpKind::Install | OpKind::Rollback => Some(Phase::Installing),
                OpKind::Restart => Some(Phase::Starting),
                OpKind::Stop | OpKind::Verify => None,
            },
        };
        if let Some(p) = phase {
            inner.service.phase = p;
            inner.store_service(&self.dir).map_err(storage)?;
            self.phase_tx.send_replace(p);
        }
        let (tx, rx) = watch::channel(None);
        inner.running = Some(Running {
            id: header.id.clone(),
            kind,
            done: rx.clone(),
        });
        drop(inner);
        tracing::info!(op = %header.id, kind = kind.name(), epoch = header.epoch.get(), attempt = rec.attempt, "operation started");
        self.poke.notify_one();
        Ok(Admission::Started(rec, tx, rx))
    }

    /// A caller with a newer epoch takes over the running operation `header.id`: the epoch is
    /// stored durably first (as admission does, so that older leaders are refused from now
    /// on), then the adoption is journaled, so that the record carries the adopter's epoch
    /// also after a restart.
    fn adopt(&self, inner: &mut Inner, header: &OpHeader) -> Result<(), AgentError> {
        if header.epoch > inner.epoch {
            self.dir
                .store_epoch(header.epoch)
                .map_err(|e| AgentError::Storage(e.to_string()))?;
            inner.epoch = header.epoch;
        }
        inner.journal.adopt(&header.id, header.epoch, now_ms())?;
        tracing::info!(op = %header.id, epoch = header.epoch.get(), "running operation adopted by a newer epoch");
        Ok(())
    }

    /// True when `id` is the operation running now.
    pub fn is_running(&self, id: &str) -> bool {
        self.lock().running.as_ref().is_some_and(|r| r.id == id)
    }

    fn finish(&self, mut rec: OpRecord, outcome: Outcome) -> OpRecord {
        let mut inner = self.lock();
        // An adoption while it ran may have raised the operation's epoch.
        if let Some(journaled) = inner.journal.get(&rec.id) {
            rec.epoch = journaled.epoch;
        }
        rec.state = if outcome.ok {
            OpState::Succeeded
        } else {
            OpState::Failed
        };
        rec.finished_at_ms = now_ms();
        rec.message = outcome.message;
        rec.output = outcome.output;
        inner.service.phase = outcome.phase;
        self.phase_tx.send_replace(outcome.phase);
        rec.version = self.version_of(&inner.service);
        if let Err(e) = inner.store_service(&self.dir) {
            tracing::error!(error = %e, "cannot store the service record");
        }
        if let Err(e) = inner.journal.end(&rec) {
            // The result still reaches the caller; after a restart the journal will call this
            // operation interrupted and a repeat will run it again, which every step tolerates.
            tracing::error!(error = %e, op = %rec.id, "cannot journal the end of an operation");
        }
        inner.running = None;
        crate::metrics::METRICS.operation(
            rec.kind.name(),
            outcome.ok,
            Duration::from_millis(rec.finished_at_ms.saturating_sub(rec.started_at_ms)),
        );
        tracing::info!(op = %rec.id, kind = rec.kind.name(), ok = outcome.ok, message = %rec.message, "operation ended");
        rec
    }

    fn version_of(&self, s: &ServiceRecord) -> String {
        if s.installed_version.is_empty() {
            self.initial_version.clone()
        } else {
            s.installed_version.clone()
        }
    }

    /// Where the verified artifact with `sha256` is kept in the cache.
    pub fn artifact_path(&self, sha256: &str) -> PathBuf {
        self.fetcher.path_of(sha256)
    }

    /// Writes the bound address to `<state_dir>/agent.addr` (0600, replaced atomically).
    pub fn write_addr_file(&self, addr: std::net::SocketAddr) -> Result<(), AgentError> {
        self.write_named_addr("agent.addr", addr)
    }

    /// Writes an address to `<state_dir>/<name>` (0600, replaced atomically).
    pub fn write_named_addr(
        &self,
        name: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), AgentError> {
        self.dir
            .write_private(name, addr.to_string().as_bytes())
            .map_err(|e| AgentError::Storage(format!("cannot write {name}: {e}")))
    }

    /// Fetches and verifies an artifact into the store (before admission: a bad artifact
    /// changes nothing).
    pub async fn fetch_artifact(&self, source: &str, sha256: &str) -> Result<PathBuf, AgentError> {
        Ok(self.fetcher.fetch_verified(source, sha256).await?)
    }

    async fn work(&self, rec: &OpRecord, body: OpBody) -> Outcome {
        let svc = &self.cfg.service;
        match body {
            OpBody::Drain {
                timeout,
                on_timeout,
            } => self.drain(timeout, on_timeout).await,
            OpBody::Stop => match self.hook("stop", &svc.stop, &[]).await {
                Ok(output) => Outcome {
                    ok: true,
                    message: "stopped".into(),
                    output,
                    phase: Phase::Stopped,
                },
                Err((message, output)) => Outcome {
                    ok: false,
                    message,
                    output,
                    phase: Phase::Failed,
                },
            },
            OpBody::Install {
                artifact,
                sha256,
                version,
                timeout,
            } => {
                self.install(rec, &artifact, &sha256, &version, timeout, false)
                    .await
            }
            OpBody::Rollback {
                timeout,
                from_version,
                fallback_sha256,
            } => {
                let prev = self.lock().service.clone();
                let (version, sha256) = match self.rollback_source(&prev, &from_version) {
                    // Nothing of this plan is installed here: keep the service as it is.
                    Ok(RollbackSource::Moot(message)) => {
                        return Outcome {
                            ok: true,
                            message,
                            output: String::new(),
                            phase: prev.phase,
                        }
                    }
                    Ok(RollbackSource::Cached { version, sha256 }) => (version, sha256),
                    Ok(RollbackSource::NeedsArtifact { version, lost }) => match fallback_sha256 {
                        Some(sha256) => (version, sha256),
                        None => {
                            return self
                                .refused_at_work(no_rollback_artifact(&version, lost).to_string())
                        }
                    },
                    Err(e) => return self.refused_at_work(e.to_string()),
                };
                let artifact = self.artifact_path(&sha256);
                self.install(rec, &artifact, &sha256, &version, timeout, true)
                    .await
            }
            OpBody::Restart {
                timeout,
                drain_first,
            } => self.restart(timeout, drain_first).await,
            OpBody::Verify { stable, timeout } => self.verify(stable, timeout).await,
        }
    }

    /// Admission checked the same thing, so this only happens if the record changed in
    /// between; nothing was run, and the service (stopped, as admission required) is left so.
    fn refused_at_work(&self, message: String) -> Outcome {
        Outcome {
            ok: false,
            message,
            output: String::new(),
            phase: Phase::Stopped,
        }
    }

    async fn hook(
        &self,
        name: &str,
        argv: &[String],
        env: &[(&str, String)],
    ) -> Result<String, (String, String)> {
        let limit = self.cfg.service.hook_timeout;
        let r = hooks::run(argv, env, limit).await;
        if !matches!(&r, Ok(o) if o.success()) {
            crate::metrics::METRICS.hook_failed(name);
        }
        match r {
            Ok(o) if o.success() => Ok(o.output),
            Ok(o) => Err((o.describe(name, limit), o.output)),
            Err(e) => Err((format!("{name} command could not run: {e}"), String::new())),
        }
    }

    async fn drain(&self, timeout: Duration, on_timeout: OnDrainTimeout) -> Outcome {
        let svc = &self.cfg.service;
        let mut output = match self.hook("drain", &svc.drain, &[]).await {
            Ok(o) => o,
            Err((message, output)) => {
                return Outcome {
                    ok: false,
                    message,
                    output,
                    phase: Phase::Draining,
                }
            }
        };
        self.poke.notify_one();
        let left = self.wait_for_no_connections(timeout).await;
        let forced = left > 0;
        if forced && on_timeout == OnDrainTimeout::Fail {
            return Outcome {
                ok: false,
                message: format!("drain timed out after {}ms with {left} connection(s) still open; the service is left draining", timeout.as_millis()),
                output,
                phase: Phase::Draining,
            };
        }
        match self.hook("stop", &svc.stop, &[]).await {
            Ok(o) => {
                output.push_str(&o);
                let message = if forced {
                    format!("drain timed out with {left} connection(s) open; stopped by force")
                } else {
                    "drained: no connections left; stopped".to_owned()
                };
                Outcome {
                    ok: true,
                    message,
                    output,
                    phase: Phase::Drained,
                }
            }
            Err((message, o)) => {
                output.push_str(&o);
                Outcome {
                    ok: false,
                    message,
                    output,
                    phase: Phase::Failed,
                }
            }
        }
    }

    async fn install(
        &self,
        rec: &OpRecord,
        artifact: &std::path::Path,
        sha256: &str,
        version: &str,
        timeout: Duration,
        rollback: bool,
    ) -> Outcome {
        let before = self.lock().service.clone();
        let previous_version = self.version_of(&before);
        let env = [
            ("ROLLGATE_ARTIFACT", artifact.display().to_string()),
            ("ROLLGATE_VERSION", version.to_owned()),
            ("ROLLGATE_PREVIOUS_VERSION", previous_version.clone()),
            ("ROLLGATE_SERVER_ID", self.cfg.server_id.clone()),
            ("ROLLGATE_OPERATION_ID", rec.id.clone()),
            (
                "ROLLGATE_ROLLBACK",
                if rollback { "1" } else { "0" }.to_owned(),
            ),
        ];
        // A rerun after the agent died mid-install: if the interrupted attempt did install
        // this version, do not install it a second time.
        let already = rec.attempt > 1 && self.reported_version().await.as_deref() == Some(version);
        let result = if already {
            Ok(hooks::HookOutcome {
                code: Some(0),
                output: format!(
                    "version {version} was already installed by the interrupted attempt {}",
                    rec.attempt - 1
                ),
                timed_out: false,
            })
        } else {
            hooks::run(&self.cfg.service.install, &env, timeout).await
        };
        match result {
            Ok(o) if o.success() => {
                let mut inner = self.lock();
                let s = &mut inner.service;
                // Reinstalling the installed version (a second plan, a retried step under a new
                // id) is not an upgrade: rotating would make the version its own "previous",
                // and a later rollback would return to it instead of to the real previous one.
                if version != previous_version {
                    s.previous_version = previous_version;
                    s.previous_sha256 = std::mem::take(&mut s.installed_sha256);
                }
                s.installed_version = version.to_owned();
                s.installed_sha256 = sha256.to_owned();
                let keep = [s.installed_sha256.clone(), s.previous_sha256.clone()];
                drop(inner);
                artifact::prune(&self.dir.artifacts(), &[keep[0].as_str(), keep[1].as_str()]);
                let what = if rollback {
                    "rolled back to"
                } else {
                    "installed"
                };
                Outcome {
                    ok: true,
                    message: format!("{what} version {version}"),
                    output: o.output,
                    phase: Phase::Stopped,
                }
            }
            Ok(o) => Outcome {
                ok: false,
                message: o.describe("install", timeout),
                output: o.output,
                phase: Phase::Failed,
            },
            Err(e) => Outcome {
                ok: false,
                message: format!("install command could not run: {e}"),
                output: String::new(),
                phase: Phase::Failed,
            },
        }
    }

    /// The version the service itself reports (its version command), if it has one.
    async fn reported_version(&self) -> Option<String> {
        let argv = &self.cfg.service.version_command;
        if argv.is_empty() {
            return None;
        }
        match hooks::run(argv, &[], self.cfg.service.hook_timeout).await {
            Ok(o) if o.success() => Some(o.output.trim().to_owned()),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the established connections on the service's ports to reach
    /// zero; returns how many are left.
    async fn wait_for_no_connections(&self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        let left = wait::until(deadline, || async {
            match self.count_connections().await {
                0 => Ok(()),
                left => Err(left),
            }
        })
        .await;
        left.err().unwrap_or(0)
    }

    /// Records the service's phase mid-operation (durably, so that a crash meanwhile does not
    /// misreport it) and tells watchers.
    fn set_phase(&self, phase: Phase) {
        let mut inner = self.lock();
        inner.service.phase = phase;
        self.phase_tx.send_replace(phase);
        if let Err(e) = inner.store_service(&self.dir) {
            tracing::error!(error = %e, "cannot store the service record");
        }
        drop(inner);
        self.poke.notify_one();
    }

    /// Drains a service that accepts connections before restarting it: the drain hook, then
    /// up to `timeout` for its connections to close. `Err` is the failed outcome: connections
    /// remain, and the service is left draining with none of them cut.
    async fn drain_before_restart(
        &self,
        timeout: Duration,
        output: &mut String,
    ) -> Result<(), Outcome> {
        self.set_phase(Phase::Draining);
        match self.hook("drain", &self.cfg.service.drain, &[]).await {
            Ok(o) => output.push_str(&o),
            Err((message, o)) => {
                output.push_str(&o);
                return Err(Outcome {
                    ok: false,
                    message: format!("restart: {message}"),
                    output: std::mem::take(output),
                    phase: Phase::Draining,
                });
            }
        }
        self.poke.notify_one();
        let left = self.wait_for_no_connections(timeout).await;
        if left > 0 {
            return Err(Outcome {
                ok: false,
                message: format!(
                    "restart not done: the service was accepting connections, and after draining it for {}ms {left} connection(s) still open; the service is left draining",
                    timeout.as_millis()
                ),
                output: std::mem::take(output),
                phase: Phase::Draining,
            });
        }
        self.set_phase(Phase::Starting);
        Ok(())
    }

    async fn restart(&self, timeout: Duration, drain_first: Option<Duration>) -> Outcome {
        let svc = &self.cfg.service;
        let mut output = String::new();
        let accepting = probe::accepting(&svc.probe_host, &svc.ports, svc.probe_timeout).await;
        let stop_start: Vec<(&str, &[String])> = vec![("stop", &svc.stop), ("start", &svc.start)];
        let steps: Vec<(&str, &[String])> = match drain_first {
            // A restart that timed out may have come up and taken traffic since: a retry must
            // not cut those connections, so it drains them first.
            Some(drain_timeout) if accepting => {
                if let Err(failed) = self.drain_before_restart(drain_timeout, &mut output).await {
                    return failed;
                }
                // Drained is not necessarily stopped (a service manager may keep the process).
                if svc.restart.is_empty() {
                    stop_start
                } else {
                    vec![("restart", &svc.restart)]
                }
            }
            _ if !svc.restart.is_empty() => vec![("restart", &svc.restart)],
            _ if accepting => stop_start,
            _ => {
                // Not accepting, but a process may still be there: a drain that timed out
                // leaves the service finishing its open connections. Those are never cut:
                // they are given the drain's time to finish, then the process is stopped
                // before the start (a start next to a live process would not take over).
                let mut left = self.count_connections().await;
                if left > 0 {
                    if let Some(t) = drain_first {
                        left = self.wait_for_no_connections(t).await;
                    }
                }
                if left > 0 {
                    return Outcome {
                        ok: false,
                        message: format!(
                            "restart not done: the service still has {left} open connection(s) from before; it is left draining"
                        ),
                        output,
                        phase: Phase::Draining,
                    };
                }
                if svc.stop.is_empty() {
                    vec![("start", &svc.start)]
                } else {
                    stop_start
                }
            }
        };
        for (name, argv) in steps {
            match self.hook(name, argv, &[]).await {
                Ok(o) => output.push_str(&o),
                Err((message, o)) => {
                    output.push_str(&o);
                    return Outcome {
                        ok: false,
                        message,
                        output,
                        phase: Phase::Failed,
                    };
                }
            }
        }
        let accepting = wait::until(Instant::now() + timeout, || async {
            if probe::accepting(&svc.probe_host, &svc.ports, svc.probe_timeout).await {
                Ok(())
            } else {
                Err(())
            }
        })
        .await;
        match accepting {
            Ok(()) => Outcome {
                ok: true,
                message: "started: accepting connections".into(),
                output,
                phase: Phase::Running,
            },
            Err(()) => Outcome {
                ok: false,
                message: format!(
                    "started, but not accepting connections on port(s) {:?} after {}ms",
                    svc.ports,
                    timeout.as_millis()
                ),
                output,
                phase: Phase::Failed,
            },
        }
    }

    async fn verify(&self, stable: Duration, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let mut good_since: Option<Instant> = None;
        let mut backoff = wait::Backoff::new();
        let phase = self.lock().service.phase;
        loop {
            // The connection count plays no part here, and counting walks the kernel's TCP
            // table: the last count will do.
            let h = self.probe_with(Count::Last).await;
            let good = h.accepting && h.healthy && !h.busy;
            let now = Instant::now();
            if good {
                let since = *good_since.get_or_insert_with(|| {
                    // Newly good: look again soon, to end a short stable window on time.
                    backoff.reset();
                    now
                });
                if now.duration_since(since) >= stable {
                    return Outcome {
                        ok: true,
                        message: format!(
                            "verified: accepting, healthy and not busy for {}ms; version {}",
                            stable.as_millis(),
                            h.version
                        ),
                        output: String::new(),
                        phase,
                    };
                }
            } else if good_since.take().is_some() {
                backoff.reset();
            }
            if now >= deadline {
                let why = if h.detail.is_empty() {
                    "not stable".to_owned()
                } else {
                    h.detail
                };
                return Outcome {
                    ok: false,
                    message: format!("verify failed after {}ms: {why}", timeout.as_millis()),
                    output: String::new(),
                    phase,
                };
            }
            // Never past the deadline, nor past the end of the stable window.
            let until = good_since
                .and_then(|since| since.checked_add(stable))
                .map_or(deadline, |end| deadline.min(end));
            backoff.sleep(until).await;
        }
    }

    /// Counts the service's client connections now, and keeps the count for probes that do
    /// not count.
    async fn count_connections(&self) -> u32 {
        let n = probe::active_connections(&self.ports).await;
        self.connections.store(n, Ordering::Relaxed);
        n
    }

    /// Probes the service now, its connections counted too.
    pub async fn probe(&self) -> Health {
        self.probe_with(Count::Now).await
    }

    /// Probes the service now; its connections are counted again only with [`Count::Now`].
    pub async fn probe_with(&self, count: Count) -> Health {
        let svc = &self.cfg.service;
        let accepting = probe::accepting(&svc.probe_host, &svc.ports, svc.probe_timeout).await;
        let active_connections = match count {
            Count::Now => self.count_connections().await,
            Count::Last => self.connections.load(Ordering::Relaxed),
        };
        let mut details = Vec::new();
        let healthy = match &svc.health_url {
            None => true,
            Some(url) => {
                match probe::http_health(self.fetcher.client(), url, svc.probe_timeout).await {
                    Ok(()) => true,
                    Err(e) => {
                        details.push(e);
                        false
                    }
                }
            }
        };
        let busy = if svc.busy_command.is_empty() {
            false
        } else {
            match hooks::run(&svc.busy_command, &[], svc.probe_timeout).await {
                Ok(o) if o.code == Some(0) => {
                    details.push("busy probe: busy".into());
                    true
                }
                Ok(o) if o.code == Some(1) => false,
                Ok(o) => {
                    details.push(format!(
                        "busy probe failed ({}); counted as busy",
                        o.describe("busy", svc.probe_timeout)
                    ));
                    true
                }
                Err(e) => {
                    details.push(format!("busy probe could not run ({e}); counted as busy"));
                    true
                }
            }
        };
        let inner = self.lock();
        let state = match inner.service.phase {
            Phase::Running if accepting && healthy => ServiceState::Serving,
            Phase::Running => {
                if !accepting {
                    details.insert(
                        0,
                        format!("not accepting connections on port(s) {:?}", svc.ports),
                    );
                }
                ServiceState::Failed
            }
            Phase::Draining => ServiceState::Draining,
            Phase::Drained => ServiceState::Drained,
            Phase::Stopped => ServiceState::Stopped,
            Phase::Installing => ServiceState::Installing,
            Phase::Starting => ServiceState::Starting,
            Phase::Failed => ServiceState::Failed,
        };
        Health {
            state,
            accepting,
            busy,
            healthy,
            active_connections,
            version: self.version_of(&inner.service),
            installed_sha256: inner.service.installed_sha256.clone(),
            previous_version: inner.service.previous_version.clone(),
            epoch: inner.epoch,
            observed_at_ms: now_ms(),
            detail: details.join("; "),
            last_op: inner.journal.last().cloned(),
        }
    }

    /// A receiver of health reports, told of every change (the probe time alone is none).
    pub fn subscribe(&self) -> watch::Receiver<Health> {
        self.health_tx.subscribe()
    }

    /// The service's phase, changed the moment an operation changes it.
    pub fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// Keeps grpc.health.v1's overall status ("") on the front end: SERVING only while the
    /// service runs normally and its last probe found it serving; NOT_SERVING from the moment
    /// a drain, stop, install or restart is admitted. Ends at shutdown.
    pub async fn front_end_health(self: Arc<Self>, reporter: tonic_health::server::HealthReporter) {
        let mut phase = self.subscribe_phase();
        let mut health = self.subscribe();
        let mut last = None;
        loop {
            let serving = *phase.borrow_and_update() == Phase::Running
                && health.borrow_and_update().state == ServiceState::Serving;
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            if last != Some(status) {
                reporter.set_service_status("", status).await;
                last = Some(status);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = phase.changed() => if r.is_err() { return },
                r = health.changed() => if r.is_err() { return },
            }
        }
    }

    /// The shutdown token this agent watches.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Probes every report interval, and at once when an operation changes something, until
    /// shutdown. Run it on the task tracker returned by [`AgentCore::tasks`]. Watchers are
    /// told only of a change: the heartbeat that shows this agent alive is the watch stream's
    /// own, so a slow probe never delays it.
    pub async fn report_loop(self: Arc<Self>) {
        let mut count = Count::Now;
        loop {
            let started = std::time::Instant::now();
            let h = self.probe_with(count).await;
            crate::metrics::METRICS.probed(started.elapsed(), h.state.name());
            self.health_tx.send_if_modified(|cur| {
                let changed = Health {
                    observed_at_ms: cur.observed_at_ms,
                    ..h.clone()
                } != *cur;
                *cur = h;
                changed
            });
            // A poke is a phase change, which watchers must see at once; the connections are
            // counted by the step's own waits meanwhile, and again at the next interval.
            count = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.report_interval) => Count::Now,
                _ = self.poke.notified() => Count::Last,
            };
        }
    }

    /// The tracker of every task the agent spawned.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Stops taking work and waits up to `grace` for running operations to end. Returns false
    /// when some were still running at the deadline (the journal will say interrupted).
    pub async fn drain_tasks(&self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

enum Admission {
    Replay(Reply),
    Attach(watch::Receiver<Option<OpRecord>>),
    Started(
        OpRecord,
        watch::Sender<Option<OpRecord>>,
        watch::Receiver<Option<OpRecord>>,
    ),
}

fn replayed(rec: &OpRecord) -> Reply {
    Reply {
        record: rec.clone(),
        replayed: true,
    }
}

/// The answer to a state-changing call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The operation as journaled.
    pub record: OpRecord,
    /// True when it came from the journal rather than from running it now.
    pub replayed: bool,
}

/// What a rollback would do now.
#[derive(Debug)]
enum RollbackSource {
    /// Nothing: the version to roll back from is not installed (the message says so).
    Moot(String),
    /// Reinstall `version` from the agent's own cache.
    Cached {
        /// The previous version.
        version: String,
        /// Its cached artifact.
        sha256: String,
    },
    /// `version` is known but its artifact is not in the cache: the caller must supply it.
    NeedsArtifact {
        /// The previous version.
        version: String,
        /// True when the agent had cached it once (it has gone from the cache since).
        lost: bool,
    },
}

/// The refusal of a rollback to `version` when its artifact is not cached and the caller gave
/// none. One line, naming the version and the remedy, since whoever wrote the plan reads it.
fn no_rollback_artifact(version: &str, lost: bool) -> AgentError {
    let why = if lost {
        "its artifact is no longer in this agent's cache"
    } else {
        "it was installed outside rollgate, so this agent has no artifact of it"
    };
    AgentError::Precondition(format!(
        "cannot roll back to version {version}: {why}; give the plan a rollback artifact (fallback_artifact and fallback_sha256)"
    ))
}

impl AgentCore {
    /// What a rollback from `from_version` (empty: from whatever is installed) would do now.
    fn rollback_source(
        &self,
        s: &ServiceRecord,
        from_version: &str,
    ) -> Result<RollbackSource, AgentError> {
        let current = self.version_of(s);
        if !from_version.is_empty() && current != from_version {
            return Ok(RollbackSource::Moot(format!(
                "nothing to roll back: version {current} is installed, not {from_version}"
            )));
        }
        if s.previous_version.is_empty() {
            return Err(AgentError::Precondition(format!(
                "nothing to roll back to: this agent knows no version installed before {}",
                if current.is_empty() {
                    "the current one"
                } else {
                    current.as_str()
                }
            )));
        }
        let cached =
            !s.previous_sha256.is_empty() && self.artifact_path(&s.previous_sha256).is_file();
        Ok(if cached {
            RollbackSource::Cached {
                version: s.previous_version.clone(),
                sha256: s.previous_sha256.clone(),
            }
        } else {
            RollbackSource::NeedsArtifact {
                version: s.previous_version.clone(),
                lost: !s.previous_sha256.is_empty(),
            }
        })
    }

    /// True when a rollback from `from_version` could only run with the caller's fallback
    /// artifact (so that it is fetched only then).
    pub fn rollback_needs_artifact(&self, from_version: &str) -> bool {
        let s = self.lock().service.clone();
        matches!(
            self.rollback_source(&s, from_version),
            Ok(RollbackSource::NeedsArtifact { .. })
        )
    }

    /// Refuses an epoch older than the highest accepted, changing nothing.
    pub fn refuse_stale(&self, header: &OpHeader) -> Result<(), AgentError> {
        let inner = self.lock();
        self.check_epoch(&inner, header)
    }

    fn prepared(
        &self,
        header: &OpHeader,
        kind: OpKind,
        started_at_ms: u64,
        message: String,
    ) -> Reply {
        let version = self.version_of(&self.lock().service);
        Reply {
            record: OpRecord {
                id: header.id.clone(),
                kind,
                epoch: header.epoch,
                state: OpState::Succeeded,
                started_at_ms,
                finished_at_ms: now_ms(),
                message,
                version,
                output: String::new(),
                // Not an attempt: nothing ran and nothing was journaled.
                attempt: 0,
            },
            replayed: false,
        }
    }

    /// InstallPatch{prepare_only}: fetches and verifies the artifact into the cache, before a
    /// server is taken down, so that a bad artifact takes nothing down. The service is not
    /// touched, nothing is journaled and the epoch is not raised (it is only checked): a
    /// preparation must not fence off a leader that is still acting.
    pub async fn prepare_install(
        &self,
        header: &OpHeader,
        source: &str,
        sha256: &str,
        version: &str,
    ) -> Result<Reply, AgentError> {
        let started = now_ms();
        self.refuse_stale(header)?;
        self.fetch_artifact(source, sha256).await?;
        Ok(self.prepared(
            header,
            OpKind::Install,
            started,
            format!("prepared: the artifact of version {version} (sha256 {sha256}) is verified in the cache; nothing was installed"),
        ))
    }

    /// Rollback{prepare_only}: succeeds only if a rollback could run now. When the previous
    /// version's artifact is not cached, the caller's fallback is fetched, verified and
    /// recorded as the previous artifact, so that the real rollback uses it. The service is not
    /// touched, nothing is journaled and the epoch is not raised.
    pub async fn prepare_rollback(
        &self,
        header: &OpHeader,
        from_version: &str,
        fallback: Option<(&str, &str)>,
    ) -> Result<Reply, AgentError> {
        let started = now_ms();
        self.refuse_stale(header)?;
        let s = self.lock().service.clone();
        let (version, source, sha256) = match (self.rollback_source(&s, from_version)?, fallback) {
            (RollbackSource::Moot(message), _) => {
                return Ok(self.prepared(header, OpKind::Rollback, started, message))
            }
            (RollbackSource::Cached { version, .. }, _) => {
                return Ok(self.prepared(
                    header,
                    OpKind::Rollback,
                    started,
                    format!("a rollback can run: the artifact of version {version} is cached"),
                ))
            }
            (RollbackSource::NeedsArtifact { version, .. }, Some((source, sha256))) => {
                (version, source, sha256)
            }
            (RollbackSource::NeedsArtifact { version, lost }, None) => {
                return Err(no_rollback_artifact(&version, lost))
            }
        };
        self.fetch_artifact(source, sha256).await?;
        let mut inner = self.lock();
        // Record it only if the service record still asks for this artifact: an operation may
        // have changed it while the fallback was fetched.
        match self.rollback_source(&inner.service, from_version)? {
            RollbackSource::NeedsArtifact { version: now, .. } if now == version => {
                inner.service.previous_sha256 = sha256.to_owned();
                inner
                    .store_service(&self.dir)
                    .map_err(|e| AgentError::Storage(e.to_string()))?;
            }
            RollbackSource::NeedsArtifact { .. } => {
                return Err(AgentError::Precondition(
                    "the installed versions changed while the fallback artifact was fetched: prepare the rollback again".into(),
                ))
            }
            RollbackSource::Moot(_) | RollbackSource::Cached { .. } => {}
        }
        drop(inner);
        tracing::info!(version = %version, sha256 = %sha256, "fallback artifact recorded for a rollback");
        Ok(self.prepared(
            header,
            OpKind::Rollback,
            started,
            format!("a rollback can run: the fallback artifact of version {version} is verified and cached"),
        ))
    }

    /// Steps that are only safe in some states: installing over a serving service would take
    /// it down without a drain; a rollback needs something to roll back to.
    fn check_phase(&self, s: &ServiceRecord, body: &OpBody) -> Result<(), AgentError> {
        check_service_stopped(s, body)?;
        if let OpBody::Rollback {
            from_version,
            fallback_sha256,
            ..
        } = body
        {
            match self.rollback_source(s, from_version)? {
                RollbackSource::NeedsArtifact { version, lost } if fallback_sha256.is_none() => {
                    return Err(no_rollback_artifact(&version, lost))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Installing or rolling back over a serving service would take it down without a drain.
fn check_service_stopped(s: &ServiceRecord, body: &OpBody) -> Result<(), AgentError> {
    match body {
        OpBody::Install { .. } | OpBody::Rollback { .. } => {
            if matches!(s.phase, Phase::Running | Phase::Draining | Phase::Starting) {
                return Err(AgentError::Precondition(format!(
                    "the service is {}: drain or stop it before installing",
                    match s.phase {
                        Phase::Running => "running",
                        Phase::Draining => "still draining",
                        _ => "starting",
                    }
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core driving whatever listens on `port`, with commands that do nothing.
    async fn core_for(port: u16, dir: &std::path::Path) -> Arc<AgentCore> {
        let path = dir.join("agent.toml");
        let text = format!(
            r#"server_id = "fe-1"
pool = "p"
listen = "127.0.0.1:0"
state_dir = "{}"
insecure = true

[service]
ports = [{port}]
drain = ["true"]
start = ["true"]
stop = ["true"]
install = ["true"]
"#,
            dir.join("state").display()
        );
        std::fs::write(&path, text).expect("config written");
        let cfg = AgentConfig::load(&path).expect("a valid config");
        AgentCore::open(cfg, CancellationToken::new())
            .await
            .expect("the core opens")
    }

    /// A probe after a phase change reports the last count instead of walking the kernel's TCP
    /// table again; a counting probe, or a step's wait, refreshes it.
    #[tokio::test]
    async fn only_a_counting_probe_or_a_wait_counts_connections_again() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let core = core_for(listener.local_addr()?.port(), dir.path()).await;
        let client = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (server_side, _) = listener.accept()?;
        assert_eq!(core.probe_with(Count::Last).await.active_connections, 0);
        assert_eq!(core.probe().await.active_connections, 1);
        drop((client, server_side));
        assert_eq!(core.probe_with(Count::Last).await.active_connections, 1);
        // The drain's wait sees the client gone, and the next report says so.
        assert_eq!(
            core.wait_for_no_connections(Duration::from_secs(5)).await,
            0
        );
        assert_eq!(core.probe_with(Count::Last).await.active_connections, 0);
        Ok(())
    }
}
