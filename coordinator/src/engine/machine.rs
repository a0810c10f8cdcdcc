//! The transition function. Every handler mutates the state and pushes actions, then
//! [`Upgrade::settle`] moves the domain forward as far as the new state allows; keeping all
//! "what happens next" decisions in `settle` is what makes the invariants hold everywhere.

use super::model::{
    Action, Direction, DomainPhase, Event, PoolState, ServerPhase, ServerProgress, Status, Step,
    Upgrade,
};
use super::plan::{ExhaustedAction, FailureAction, Plan, PlanError};
use std::time::Duration;

impl Upgrade {
    /// Validates `plan` and starts it: Running, Forward, the first domain waiting for readiness.
    pub fn new(plan: Plan) -> Result<(Upgrade, Vec<Action>), PlanError> {
        plan.validate()?;
        let servers = plan
            .domains
            .iter()
            .flat_map(|d| d.servers.iter())
            .map(|s| {
                (
                    s.clone(),
                    ServerProgress {
                        phase: ServerPhase::Pending,
                        direction: Direction::Forward,
                    },
                )
            })
            .collect();
        let mut upgrade = Upgrade {
            plan,
            status: Status::Running,
            direction: Direction::Forward,
            domain_index: 0,
            domain_phase: DomainPhase::WaitingReady { busy_answers: 0 },
            servers,
            failed_over: false,
            readiness_outstanding: None,
            resume_count: 0,
        };
        let mut out = vec![upgrade.record(
            "upgrade_started",
            None,
            None,
            format!(
                "upgrading pool {} to version {} ({} domains, {} servers)",
                upgrade.plan.pool,
                upgrade.plan.version,
                upgrade.plan.domains.len(),
                upgrade.servers.len()
            ),
        )];
        upgrade.settle(&mut out);
        Ok((upgrade, out))
    }

    /// The pure transition. Never panics; events that do not fit the state are ignored with a
    /// Record.
    pub fn step(mut self, event: Event) -> (Upgrade, Vec<Action>) {
        let mut out = Vec::new();
        if self.is_terminal() {
            let message = format!(
                "upgrade is {}; ignored {}",
                self.status.name(),
                describe(&event)
            );
            out.push(self.record("ignored", None, None, message));
            return (self, out);
        }
        match event {
            Event::Readiness {
                state,
                domain_ready,
                reason,
            } => self.on_readiness(state, domain_ready, reason, &mut out),
            Event::StepDone {
                server,
                step,
                attempt,
                ok,
                message,
            } => self.on_step_done(server, step, attempt, ok, message, &mut out),
            Event::FailoverDone { ok, message } => self.on_failover_done(ok, message, &mut out),
            Event::SoakDone => self.on_soak_done(&mut out),
            Event::Pause { by } => self.on_pause(by, &mut out),
            Event::Resume { by } => self.on_resume(by, &mut out),
            Event::Abort { by } => self.on_abort(by, &mut out),
            Event::Rollback { by } => self.on_rollback(by, &mut out),
        }
        // Terminal statuses never revert and in_flight never grows under them, so this fires
        // exactly once per upgrade.
        if self.is_terminal() {
            out.push(self.record(
                "finished",
                None,
                None,
                format!("upgrade finished: {}", self.status),
            ));
            out.push(Action::Finished {
                status: self.status.clone(),
            });
        }
        (self, out)
    }

    /// What a new leader must issue after loading this state: every in-flight step again (same
    /// operation id, so the agent's journal answers a step it already ran) and the outstanding
    /// readiness check, failover or soak.
    pub fn resume(&self) -> Vec<Action> {
        if self.is_terminal() {
            return Vec::new();
        }
        let mut out: Vec<Action> = self
            .servers
            .iter()
            .filter_map(|(name, p)| match p.phase {
                ServerPhase::InFlight { step, attempt } => Some(Action::RunStep {
                    server: name.clone(),
                    step,
                    op_id: Self::op_id(&self.plan.id, name, p.direction, step, attempt),
                    attempt,
                }),
                _ => None,
            })
            .collect();
        if self.status.is_terminal() {
            return out;
        }
        if let Some(asked) = self.readiness_outstanding {
            if let Some(domain) = self.plan.domains.get(asked) {
                let after = match self.domain_phase {
                    DomainPhase::WaitingReady { busy_answers }
                        if busy_answers > 0 && asked == self.domain_index =>
                    {
                        self.plan.busy_retry_interval
                    }
                    _ => Duration::ZERO,
                };
                out.push(Action::CheckReadiness {
                    domain: domain.name.clone(),
                    after,
                });
            }
        }
        match self.domain_phase {
            DomainPhase::FailingOver => {
                if let Some(paired) = self.plan.paired() {
                    out.push(Action::Failover {
                        pool: self.plan.pool.clone(),
                        paired: paired.to_string(),
                    });
                }
            }
            DomainPhase::Soaking => out.push(Action::Soak {
                after: self.plan.canary_soak.unwrap_or_default(),
            }),
            DomainPhase::WaitingReady { .. } | DomainPhase::InProgress => {}
        }
        out
    }

    /// True once the status is terminal and no chain is still finishing: nothing will happen
    /// again and `Finished` has been emitted.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal() && self.in_flight() == 0
    }

    pub fn in_flight(&self) -> usize {
        self.servers
            .values()
            .filter(|p| matches!(p.phase, ServerPhase::InFlight { .. }))
            .count()
    }

    /// Deterministic, so every leader sends the same id for the same attempt.
    pub fn op_id(
        plan_id: &str,
        server: &str,
        direction: Direction,
        step: Step,
        attempt: u32,
    ) -> String {
        format!(
            "{plan_id}/{server}/{}/{}/{attempt}",
            direction.tag(),
            step.name()
        )
    }

    /// Name of the current domain, if the index is valid.
    pub fn current_domain(&self) -> Option<&str> {
        self.plan
            .domains
            .get(self.domain_index)
            .map(|d| d.name.as_str())
    }

    // ---- event handlers ----

    fn on_readiness(
        &mut self,
        state: PoolState,
        domain_ready: bool,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        let Some(asked) = self.readiness_outstanding.take() else {
            let message = format!("ignored a readiness answer nobody asked for ({reason})");
            out.push(self.domain_record("ignored", message));
            return;
        };
        let waiting = matches!(self.domain_phase, DomainPhase::WaitingReady { .. });
        if asked != self.domain_index
            || !waiting
            || self.status.is_terminal()
            || self.in_flight() > 0
        {
            let asked_name = self
                .plan
                .domains
                .get(asked)
                .map_or("?", |d| d.name.as_str());
            let message =
                format!("ignored a stale readiness answer for domain {asked_name} ({reason})");
            out.push(self.domain_record("ignored", message));
            // The answer we dropped may have been what the current domain waits on.
            self.settle(out);
            return;
        }
        if !self.status.is_active() {
            let message =
                format!("readiness answer while paused, asked again on resume ({reason})");
            out.push(self.domain_record("readiness_ignored", message));
            return;
        }
        let busy_answers = match self.domain_phase {
            DomainPhase::WaitingReady { busy_answers } => busy_answers,
            _ => 0,
        };
        match state {
            PoolState::Ready if domain_ready => {
                out.push(self.domain_record(
                    "readiness_ready",
                    format!("pool ready, domain ready for upgrade ({reason})"),
                ));
                self.start_domain(out);
            }
            PoolState::InsufficientActiveFrontEnds => {
                out.push(self.domain_record(
                    "readiness_insufficient",
                    format!("pool has insufficient active front ends ({reason})"),
                ));
                self.exhausted(format!("insufficient active front ends: {reason}"), out);
            }
            PoolState::Ready | PoolState::Busy => {
                let n = busy_answers.saturating_add(1);
                self.domain_phase = DomainPhase::WaitingReady { busy_answers: n };
                let what = if state == PoolState::Busy {
                    "pool busy"
                } else {
                    "domain not ready for upgrade"
                };
                out.push(self.domain_record(
                    "readiness_busy",
                    format!(
                        "{what} (answer {n} of {}): {reason}",
                        self.plan.busy_retries
                    ),
                ));
                if n >= self.plan.busy_retries {
                    self.exhausted(format!("{what} {n} times: {reason}"), out);
                } else {
                    self.ask_readiness(self.plan.busy_retry_interval, out);
                }
            }
        }
        self.settle(out);
    }

    fn on_step_done(
        &mut self,
        server: String,
        step: Step,
        attempt: u32,
        ok: bool,
        message: String,
        out: &mut Vec<Action>,
    ) {
        let Some(progress) = self.servers.get(&server) else {
            let message = format!("ignored {step} result for unknown server {server}");
            out.push(self.record("ignored", Some(&server), None, message));
            return;
        };
        let current = match progress.phase {
            ServerPhase::InFlight {
                step: s,
                attempt: a,
            } => Some((s, a)),
            _ => None,
        };
        if current != Some((step, attempt)) {
            let message = format!("ignored stale {step} result (attempt {attempt})");
            out.push(self.server_record("ignored", &server, message));
            return;
        }
        let server_direction = progress.direction;
        let outcome = if ok { "succeeded" } else { "failed" };
        if server_direction == Direction::Forward && self.direction == Direction::Backward {
            // The rollback only waited for this step to end: the rest of the forward chain is
            // pointless, the backward chain takes over once the domain is ready.
            self.set_phase(&server, ServerPhase::Pending, Direction::Backward);
            let message = format!(
                "{step} {outcome} (attempt {attempt}): {message}; server joins the rollback"
            );
            out.push(self.server_record("step_finished_before_rollback", &server, message));
        } else if ok {
            let message = format!("{step} succeeded (attempt {attempt}): {message}");
            out.push(self.server_record("step_succeeded", &server, message));
            match step.next(server_direction) {
                Some(next) => self.run_step(&server, next, 1, out),
                None => {
                    self.set_phase(&server, ServerPhase::Done, server_direction);
                    let what = match server_direction {
                        Direction::Forward => "upgraded",
                        Direction::Backward => "rolled back",
                    };
                    out.push(self.server_record("server_done", &server, format!("server {what}")));
                }
            }
        } else if attempt <= self.plan.server_retries {
            let message = format!(
                "{step} failed (attempt {attempt} of {}): {message}; retrying",
                self.plan.server_retries.saturating_add(1)
            );
            out.push(self.server_record("step_retried", &server, message));
            self.run_step(&server, step, attempt.saturating_add(1), out);
        } else {
            let failed = ServerPhase::Failed {
                step,
                message: message.clone(),
            };
            self.set_phase(&server, failed, server_direction);
            let reason = format!("server {server} failed at {step} (attempt {attempt}): {message}");
            out.push(self.server_record("server_failed", &server, reason.clone()));
            self.apply_failure(server_direction, reason, out);
        }
        self.settle(out);
    }

    fn apply_failure(
        &mut self,
        server_direction: Direction,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        if self.status.is_terminal() {
            return;
        }
        if server_direction == Direction::Backward {
            // Rolling back a rollback would loop; a human has to look.
            self.status = Status::Failed { reason };
            out.push(self.record(
                "failed",
                None,
                None,
                format!("rollback failed: {}", self.status),
            ));
            return;
        }
        match self.plan.on_failure {
            FailureAction::Pause => {
                if self.status.is_active() {
                    self.status = Status::Paused { reason };
                    out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
                }
            }
            FailureAction::Rollback => self.begin_rollback(reason, false, out),
        }
    }

    fn on_failover_done(&mut self, ok: bool, message: String, out: &mut Vec<Action>) {
        if self.domain_phase != DomainPhase::FailingOver || self.status.is_terminal() {
            // Whoever ran it, a successful failover is a fact about the pool.
            if ok {
                self.failed_over = true;
            }
            let message = format!("failover result arrived unexpectedly (ok: {ok}): {message}");
            out.push(self.domain_record("failover_result_ignored", message));
            self.settle(out);
            return;
        }
        if ok {
            self.failed_over = true;
            out.push(
                self.domain_record("failover_succeeded", format!("pool failed over: {message}")),
            );
            self.start_domain(out);
        } else {
            // Resume asks readiness once more and, if the pool is still in trouble, fails over
            // again at once: the busy budget is already spent.
            self.domain_phase = DomainPhase::WaitingReady {
                busy_answers: self.plan.busy_retries,
            };
            let reason = format!("failover to paired pool failed: {message}");
            out.push(self.domain_record("failover_failed", reason.clone()));
            if self.status.is_active() {
                self.status = Status::Paused { reason };
                out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
            }
        }
        self.settle(out);
    }

    fn on_soak_done(&mut self, out: &mut Vec<Action>) {
        if self.domain_phase != DomainPhase::Soaking || self.status.is_terminal() {
            out.push(
                self.domain_record("ignored", "ignored a soak end nobody waits for".to_string()),
            );
            return;
        }
        out.push(self.domain_record("soak_done", "canary soak finished".to_string()));
        self.enter_next_domain(out);
        self.settle(out);
    }

    fn on_pause(&mut self, by: String, out: &mut Vec<Action>) {
        if !self.status.is_active() {
            let message = format!("pause by {by} ignored: upgrade is {}", self.status.name());
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.status = Status::Paused {
            reason: format!("paused by {by}"),
        };
        let message = format!(
            "paused by {by}; {} in-flight server(s) finish their chain",
            self.in_flight()
        );
        out.push(self.record("paused", None, None, message));
    }

    fn on_resume(&mut self, by: String, out: &mut Vec<Action>) {
        if !matches!(self.status, Status::Paused { .. }) {
            let message = format!("resume by {by} ignored: upgrade is {}", self.status.name());
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.resume_count = self.resume_count.saturating_add(1);
        self.status = match self.direction {
            Direction::Forward => Status::Running,
            Direction::Backward => Status::RollingBack {
                reason: format!("rollback resumed by {by}"),
            },
        };
        out.push(self.record("resumed", None, None, format!("resumed by {by}")));
        self.settle(out);
    }

    fn on_abort(&mut self, by: String, out: &mut Vec<Action>) {
        if self.status.is_terminal() {
            let message = format!("abort by {by} ignored: upgrade is {}", self.status.name());
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.status = Status::Aborted {
            reason: format!("aborted by {by}"),
        };
        let message = format!(
            "aborted by {by}; {} in-flight server(s) finish their chain",
            self.in_flight()
        );
        out.push(self.record("aborted", None, None, message));
    }

    fn on_rollback(&mut self, by: String, out: &mut Vec<Action>) {
        let forward = self.direction == Direction::Forward;
        if !forward || !matches!(self.status, Status::Running | Status::Paused { .. }) {
            let message = format!(
                "rollback by {by} ignored: upgrade is {} ({:?})",
                self.status.name(),
                self.direction
            );
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.begin_rollback(format!("rollback requested by {by}"), true, out);
        self.settle(out);
    }

    // ---- transitions shared by handlers ----

    /// Turns the upgrade around. An operator's request overrides a pause; a failure-triggered
    /// rollback while paused waits for Resume, because the operator asked for a pause.
    fn begin_rollback(&mut self, reason: String, requested: bool, out: &mut Vec<Action>) {
        self.direction = Direction::Backward;
        let paused = matches!(self.status, Status::Paused { .. });
        if requested || !paused {
            self.status = Status::RollingBack {
                reason: reason.clone(),
            };
        }
        let message = if paused && !requested {
            format!("rollback decided ({reason}); starts on resume")
        } else {
            format!("rollback started: {reason}")
        };
        out.push(self.record("rollback_started", None, None, message));
        let touched: Vec<String> = self
            .plan
            .domains
            .iter()
            .take(self.domain_index.saturating_add(1))
            .flat_map(|d| d.servers.iter())
            .filter(|s| {
                self.servers.get(*s).is_some_and(|p| {
                    p.direction == Direction::Forward
                        && matches!(p.phase, ServerPhase::Done | ServerPhase::Failed { .. })
                })
            })
            .cloned()
            .collect();
        for server in touched {
            self.set_phase(&server, ServerPhase::Pending, Direction::Backward);
        }
        // A failover in progress keeps running: its result says where the traffic is.
        if self.domain_phase != DomainPhase::FailingOver {
            self.domain_phase = DomainPhase::WaitingReady { busy_answers: 0 };
        }
    }

    fn exhausted(&mut self, why: String, out: &mut Vec<Action>) {
        out.push(self.domain_record("exhausted", format!("pool not ready: {why}")));
        if self.direction == Direction::Backward {
            self.status = Status::Paused {
                reason: format!("rollback waiting: {why}"),
            };
            out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
            return;
        }
        match self.plan.on_exhausted {
            ExhaustedAction::Failover => match self.plan.paired().map(str::to_string) {
                Some(paired) => {
                    self.domain_phase = DomainPhase::FailingOver;
                    out.push(self.domain_record(
                        "failover_started",
                        format!("failing pool over to {paired}"),
                    ));
                    out.push(Action::Failover {
                        pool: self.plan.pool.clone(),
                        paired,
                    });
                }
                None => {
                    self.status = Status::Paused {
                        reason: format!("{why}; no paired pool to fail over to"),
                    };
                    out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
                }
            },
            ExhaustedAction::Pause => {
                self.status = Status::Paused { reason: why };
                out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
            }
            ExhaustedAction::Abort => {
                self.status = Status::Aborted { reason: why };
                out.push(self.record("aborted", None, None, format!("upgrade {}", self.status)));
            }
        }
    }

    fn start_domain(&mut self, out: &mut Vec<Action>) {
        self.domain_phase = DomainPhase::InProgress;
        let what = match self.direction {
            Direction::Forward => "upgrade",
            Direction::Backward => "rollback",
        };
        out.push(self.domain_record("domain_started", format!("domain {what} started")));
    }

    /// Moves the current domain along as far as the state allows: skips domains with nothing
    /// to do, starts domains (directly once failed over), asks readiness, launches servers,
    /// completes domains. Nothing here happens under a terminal status.
    fn settle(&mut self, out: &mut Vec<Action>) {
        // Each round either returns or moves a domain forward, so this bound is never reached
        // on a consistent state; it only guards a corrupt one.
        let rounds = self.plan.domains.len().saturating_mul(3).saturating_add(3);
        for _ in 0..rounds {
            if self.status.is_terminal() {
                return;
            }
            match self.domain_phase {
                DomainPhase::FailingOver | DomainPhase::Soaking => return,
                DomainPhase::WaitingReady { .. } => {
                    if !self.domain_has_work() {
                        self.finish_domain(out);
                        continue;
                    }
                    if self.in_flight() > 0 {
                        return;
                    }
                    if self.failed_over {
                        self.start_domain(out);
                        continue;
                    }
                    if self.status.is_active() && self.readiness_outstanding.is_none() {
                        self.ask_readiness(Duration::ZERO, out);
                    }
                    return;
                }
                DomainPhase::InProgress => {
                    if !self.domain_has_work() {
                        self.finish_domain(out);
                        continue;
                    }
                    if self.status.is_active() {
                        self.launch(out);
                    }
                    return;
                }
            }
        }
    }

    fn ask_readiness(&mut self, after: Duration, out: &mut Vec<Action>) {
        let Some(domain) = self.current_domain().map(str::to_string) else {
            return;
        };
        self.readiness_outstanding = Some(self.domain_index);
        out.push(Action::CheckReadiness { domain, after });
    }

    fn finish_domain(&mut self, out: &mut Vec<Action>) {
        match self.direction {
            Direction::Forward => {
                out.push(self.domain_record("domain_completed", "domain upgraded".to_string()));
                let has_next = self.domain_index.saturating_add(1) < self.plan.domains.len();
                if let (0, true, Some(soak)) = (self.domain_index, has_next, self.plan.canary_soak)
                {
                    // Emitted even while paused: it is only a timer, and Soaking always has one
                    // running, which keeps resume() exact.
                    self.domain_phase = DomainPhase::Soaking;
                    let message = format!("canary soak for {}", humantime::format_duration(soak));
                    out.push(self.domain_record("soak_started", message));
                    out.push(Action::Soak { after: soak });
                    return;
                }
            }
            Direction::Backward => {
                let touched = self.plan.domains.get(self.domain_index).is_some_and(|d| {
                    d.servers.iter().any(|s| {
                        self.servers
                            .get(s)
                            .is_some_and(|p| p.direction == Direction::Backward)
                    })
                });
                let message = if touched {
                    "domain rolled back"
                } else {
                    "domain never touched: nothing to roll back"
                };
                out.push(self.domain_record("domain_rolled_back", message.to_string()));
            }
        }
        self.enter_next_domain(out);
    }

    fn enter_next_domain(&mut self, out: &mut Vec<Action>) {
        match self.direction {
            Direction::Forward => {
                let next = self.domain_index.saturating_add(1);
                if next >= self.plan.domains.len() {
                    self.status = Status::Completed;
                    out.push(self.record(
                        "completed",
                        None,
                        None,
                        "every domain upgraded".to_string(),
                    ));
                    return;
                }
                self.domain_index = next;
            }
            Direction::Backward => {
                if self.domain_index == 0 {
                    self.status = Status::RolledBack;
                    out.push(self.record(
                        "rolled_back",
                        None,
                        None,
                        "every touched server rolled back".to_string(),
                    ));
                    return;
                }
                self.domain_index -= 1;
            }
        }
        self.domain_phase = DomainPhase::WaitingReady { busy_answers: 0 };
    }

    /// Whether the current domain still has anything to do in the current direction.
    fn domain_has_work(&self) -> bool {
        let Some(domain) = self.plan.domains.get(self.domain_index) else {
            return false;
        };
        domain.servers.iter().any(|s| {
            self.servers.get(s).is_some_and(|p| match self.direction {
                Direction::Forward => p.phase != ServerPhase::Done,
                Direction::Backward => match p.direction {
                    Direction::Backward => p.phase != ServerPhase::Done,
                    Direction::Forward => matches!(p.phase, ServerPhase::InFlight { .. }),
                },
            })
        })
    }

    /// Fills free slots of the current domain: failed servers first (only Resume makes them
    /// launchable again), then pending ones, each in name order.
    fn launch(&mut self, out: &mut Vec<Action>) {
        let Some(domain) = self.plan.domains.get(self.domain_index) else {
            return;
        };
        let mut names = domain.servers.clone();
        names.sort();
        names.dedup();
        let slots = (self.plan.parallelism as usize).saturating_sub(self.in_flight());
        let retry_attempt = self
            .plan
            .server_retries
            .saturating_add(1)
            .saturating_add(self.resume_count);
        let first = self.plan.first_step();
        let failed = names.iter().filter_map(|s| {
            let p = self.servers.get(s)?;
            match &p.phase {
                ServerPhase::Failed { step, .. } if p.direction == self.direction => {
                    Some((s.clone(), *step, retry_attempt))
                }
                _ => None,
            }
        });
        let pending = names.iter().filter_map(|s| {
            let p = self.servers.get(s)?;
            (p.phase == ServerPhase::Pending && p.direction == self.direction)
                .then(|| (s.clone(), first, 1))
        });
        let launches: Vec<(String, Step, u32)> = failed.chain(pending).take(slots).collect();
        for (server, step, attempt) in launches {
            self.run_step(&server, step, attempt, out);
        }
    }

    fn run_step(&mut self, server: &str, step: Step, attempt: u32, out: &mut Vec<Action>) {
        let direction = self
            .servers
            .get(server)
            .map_or(self.direction, |p| p.direction);
        self.set_phase(server, ServerPhase::InFlight { step, attempt }, direction);
        let op_id = Self::op_id(&self.plan.id, server, direction, step, attempt);
        let message = format!("{step} started (attempt {attempt}, op {op_id})");
        out.push(self.server_record("step_started", server, message));
        out.push(Action::RunStep {
            server: server.to_string(),
            step,
            op_id,
            attempt,
        });
    }

    fn set_phase(&mut self, server: &str, phase: ServerPhase, direction: Direction) {
        if let Some(p) = self.servers.get_mut(server) {
            p.phase = phase;
            p.direction = direction;
        }
    }

    // ---- history records ----

    fn record(
        &self,
        kind: &str,
        server: Option<&str>,
        domain: Option<&str>,
        message: String,
    ) -> Action {
        Action::Record {
            kind: kind.to_string(),
            server: server.map(str::to_string),
            domain: domain.map(str::to_string),
            message,
        }
    }

    fn domain_record(&self, kind: &str, message: String) -> Action {
        self.record(kind, None, self.current_domain(), message)
    }

    fn server_record(&self, kind: &str, server: &str, message: String) -> Action {
        let domain = self
            .plan
            .domain_of(server)
            .and_then(|i| self.plan.domains.get(i))
            .map(|d| d.name.as_str());
        self.record(kind, Some(server), domain, message)
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Readiness { state, .. } => format!("readiness answer {state:?}"),
        Event::StepDone {
            server,
            step,
            attempt,
            ok,
            ..
        } => format!("{step} result for {server} (attempt {attempt}, ok: {ok})"),
        Event::FailoverDone { ok, .. } => format!("failover result (ok: {ok})"),
        Event::SoakDone => "soak end".to_string(),
        Event::Pause { by } => format!("pause by {by}"),
        Event::Resume { by } => format!("resume by {by}"),
        Event::Abort { by } => format!("abort by {by}"),
        Event::Rollback { by } => format!("rollback by {by}"),
    }
}
