//! The transition function. Every handler mutates the state and pushes actions, then
//! [`Upgrade::settle`] moves the upgrade forward as far as the new state allows; keeping all
//! "what happens next" decisions in `settle` is what makes the invariants hold everywhere.

use super::model::{
    Action, Direction, DomainPhase, Event, Outcome, PoolState, ServerPhase, ServerProgress, Status,
    Step, Upgrade,
};
use super::plan::{ExhaustedAction, FailureAction, Plan, PlanError};
use std::time::Duration;

impl Upgrade {
    /// Validates `plan` and starts it: Running, Forward, the first domain in progress.
    pub fn new(plan: Plan) -> Result<(Upgrade, Vec<Action>), PlanError> {
        plan.validate()?;
        let servers = plan
            .servers()
            .map(|s| {
                (
                    s.clone(),
                    ServerProgress {
                        phase: ServerPhase::Pending,
                        direction: Direction::Forward,
                        down: false,
                    },
                )
            })
            .collect();
        let mut upgrade = Upgrade {
            plan,
            status: Status::Running,
            direction: Direction::Forward,
            domain_index: 0,
            domain_phase: DomainPhase::InProgress,
            servers,
            failed_over: false,
            readiness_outstanding: None,
            readiness_asked: 0,
            busy_answers: 0,
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
        upgrade.enter_domain(&mut out);
        upgrade.settle(&mut out);
        Ok((upgrade, out))
    }

    /// Rolls a completed upgrade back as a new plan (id `new_id`): the same domains and
    /// policies, walked backward from the last domain, each server going back to the version it
    /// ran before, with the readiness gate before every server goes down, as a rollback an
    /// operator asks for during an upgrade. `None` unless `done` completed and nothing of it
    /// still runs.
    pub fn revert(
        done: &Upgrade,
        new_id: String,
        by: &str,
    ) -> Result<Option<(Upgrade, Vec<Action>)>, PlanError> {
        if done.status != Status::Completed || !done.is_terminal() {
            return Ok(None);
        }
        let mut plan = done.plan.clone();
        let from = plan.id.clone();
        plan.id = new_id;
        plan.validate()?;
        let mut upgrade = Upgrade {
            domain_index: plan.domains.len().saturating_sub(1),
            plan,
            status: Status::Running,
            direction: Direction::Forward,
            domain_phase: DomainPhase::InProgress,
            servers: done.servers.clone(),
            failed_over: done.failed_over,
            readiness_outstanding: None,
            readiness_asked: 0,
            busy_answers: 0,
            resume_count: 0,
        };
        let mut out = vec![upgrade.record(
            "upgrade_started",
            None,
            None,
            format!(
                "rolling pool {} back from version {} (plan {from}) to each server's previous version ({} domains, {} servers)",
                upgrade.plan.pool,
                upgrade.plan.version,
                upgrade.plan.domains.len(),
                upgrade.servers.len()
            ),
        )];
        upgrade.begin_rollback(
            format!("rollback of completed plan {from} requested by {by}"),
            true,
            &mut out,
        );
        upgrade.enter_domain(&mut out);
        upgrade.settle(&mut out);
        Ok(Some((upgrade, out)))
    }

    /// A state for a stored plan that can no longer be executed (it fails validation, e.g. a
    /// duration beyond its bound): paused with the reason, so that the pool stays manageable.
    /// Steps already in flight are still answered and finish; nothing new is launched.
    pub fn block(mut self, error: &PlanError) -> (Upgrade, Vec<Action>) {
        let reason = format!(
            "the stored plan cannot be executed: {error}; abort it and start a new upgrade"
        );
        let mut out = Vec::new();
        if !self.status.is_terminal() && self.status.reason() != Some(reason.as_str()) {
            self.status = Status::Paused {
                reason: reason.clone(),
            };
            out.push(self.record("paused", None, None, reason));
        }
        (self, out)
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
                id,
                state,
                domain_ready,
                reason,
            } => self.on_readiness(id, state, domain_ready, reason, &mut out),
            Event::StepDone {
                server,
                step,
                attempt,
                outcome,
            } => self.on_step_done(server, step, attempt, outcome, &mut out),
            Event::FailoverDone { ok, message } => self.on_failover_done(ok, message, &mut out),
            Event::SoakDone => self.on_soak_done(&mut out),
            Event::WindowOpen => self.on_window_open(&mut out),
            Event::Internal { message } => self.on_internal(message, &mut out),
            Event::Pause { by } => self.on_pause(by, &mut out),
            Event::Resume { by } => self.on_resume(by, &mut out),
            Event::Abort { by } => self.on_abort(by, &mut out),
            Event::Rollback { by } => self.on_rollback(by, &mut out),
        }
        self.settle(&mut out);
        // Terminal statuses never revert, and `settle` launches every restore in the same
        // transition that ends the run, so this fires exactly once per upgrade.
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
    /// operation id, so the agent's journal answers or adopts a step it already runs) and the
    /// outstanding readiness check, failover or soak.
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
                    direction: p.direction,
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
                let after = if self.busy_answers > 0 && asked == self.domain_index {
                    self.plan.busy_retry_interval
                } else {
                    Duration::ZERO
                };
                out.push(Action::CheckReadiness {
                    id: self.readiness_asked,
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
            DomainPhase::AwaitingWindow => {
                if let Some(domain) = self.current_domain() {
                    out.push(Action::AwaitWindow {
                        domain: domain.to_string(),
                    });
                }
            }
            DomainPhase::InProgress => {}
        }
        out
    }

    /// True once the status is terminal and no chain is still finishing: nothing will happen
    /// again and `Finished` has been emitted.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal() && self.in_flight() == 0
    }

    /// Servers whose step answer is awaited.
    pub fn in_flight(&self) -> usize {
        self.servers
            .values()
            .filter(|p| matches!(p.phase, ServerPhase::InFlight { .. }))
            .count()
    }

    /// Servers this upgrade took out of service that are not back and not being worked on,
    /// with the reason: what an operator must look at.
    pub fn out_of_service(&self) -> Vec<(String, String)> {
        self.plan
            .servers()
            .filter_map(|s| {
                let reason = self.servers.get(s)?.out_of_service()?;
                Some((s.clone(), reason))
            })
            .collect()
    }

    /// Servers of this plan that are down or going down now (a step that takes them down is
    /// in flight, unanswered, or failed): readiness counts them as inactive whatever their
    /// last health report says.
    pub fn down_servers(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|(_, p)| p.down)
            .map(|(s, _)| s.clone())
            .collect()
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

    /// Whether a server of the current domain is prepared and waits for the readiness gate.
    pub fn waiting_ready(&self) -> bool {
        self.readiness_outstanding.is_some()
    }

    // ---- event handlers ----

    fn on_readiness(
        &mut self,
        id: u64,
        state: PoolState,
        domain_ready: bool,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        if self.readiness_outstanding.is_none() || id != self.readiness_asked {
            // Not the question asked now: an older check (asked before a rollback, a pause
            // or a leader change) whose answer predates what happened since.
            out.push(self.domain_record(
                "readiness_ignored",
                format!("readiness answer {id} is not the one awaited: {reason}"),
            ));
            return;
        }
        if self.readiness_outstanding != Some(self.domain_index) {
            // Asked for a domain the upgrade has left: the gate of the current one asks anew.
            self.readiness_outstanding = None;
            out.push(self.domain_record(
                "readiness_ignored",
                format!("readiness answer for a domain no longer current: {reason}"),
            ));
            return;
        }
        self.readiness_outstanding = None;
        if !self.status.is_active() {
            // Paused or ended meanwhile: the answer is dropped; Resume asks again.
            return;
        }
        if self.domain_phase != DomainPhase::InProgress || !self.gate_open() {
            return;
        }
        match state {
            PoolState::InsufficientActiveFrontEnds => {
                out.push(self.domain_record(
                    "readiness_insufficient",
                    format!("pool has insufficient active front ends ({reason})"),
                ));
                self.exhausted(format!("insufficient active front ends: {reason}"), out);
            }
            PoolState::Ready if domain_ready => {
                self.busy_answers = 0;
                if let Some(server) = self.next_prepared() {
                    out.push(self.server_record(
                        "readiness_ready",
                        &server,
                        format!("pool ready: {reason}"),
                    ));
                    self.take_down(&server, out);
                }
            }
            PoolState::Ready | PoolState::Busy => {
                let n = self.busy_answers.saturating_add(1);
                self.busy_answers = n;
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
    }

    fn on_step_done(
        &mut self,
        server: String,
        step: Step,
        attempt: u32,
        outcome: Outcome,
        out: &mut Vec<Action>,
    ) {
        let Some(progress) = self.servers.get(&server) else {
            let message = format!("ignored {step} result for unknown server {server}");
            out.push(self.record("ignored", Some(&server), None, message));
            return;
        };
        if progress.phase != (ServerPhase::InFlight { step, attempt }) {
            let message = format!("ignored stale {step} result (attempt {attempt})");
            out.push(self.server_record("ignored", &server, message));
            return;
        }
        let direction = progress.direction;
        let message = outcome.message().to_string();
        if step == Step::Prepare
            && direction == Direction::Forward
            && self.direction == Direction::Backward
        {
            // A forward prepare (one prepared ahead, or one of the domain the rollback started
            // in) answered after the pool turned back: that pass is over, and a prepare
            // changed nothing on the server, so it is untouched whatever the answer.
            out.push(self.server_record(
                "ignored",
                &server,
                format!(
                    "forward prepare answered after the rollback began (attempt {attempt}): \
                     {message}; the server stays untouched"
                ),
            ));
            self.set_phase(&server, ServerPhase::Pending, Direction::Forward);
            return;
        }
        match outcome {
            Outcome::Succeeded { .. } => {
                out.push(self.server_record(
                    "step_succeeded",
                    &server,
                    format!("{step} succeeded (attempt {attempt}): {message}"),
                ));
                let rolling_back = self.direction == Direction::Backward
                    && direction == Direction::Forward
                    && !self.status.is_terminal();
                if rolling_back {
                    self.join_rollback(&server, out);
                } else if step == Step::Prepare {
                    self.set_phase(&server, ServerPhase::Prepared, direction);
                } else {
                    match step.next(direction) {
                        Some(next) => self.run_step(&server, next, 1, out),
                        None => {
                            self.set_phase(&server, ServerPhase::Done, direction);
                            if let Some(p) = self.servers.get_mut(&server) {
                                p.down = false;
                            }
                            let what = match direction {
                                Direction::Forward => "upgraded",
                                Direction::Backward => "rolled back",
                                Direction::Restore => "back in service (not upgraded)",
                            };
                            out.push(self.server_record(
                                "server_done",
                                &server,
                                format!("server {what}"),
                            ));
                        }
                    }
                }
            }
            Outcome::Failed { .. } if attempt <= self.plan.server_retries => {
                let message = format!(
                    "{step} failed (attempt {attempt} of {}): {message}; retrying",
                    self.plan.server_retries.saturating_add(1)
                );
                out.push(self.server_record("step_retried", &server, message));
                self.run_step(&server, step, attempt.saturating_add(1), out);
            }
            Outcome::Failed { .. } => {
                let failed = ServerPhase::Failed {
                    step,
                    message: message.clone(),
                };
                self.set_phase(&server, failed, direction);
                let reason =
                    format!("server {server} failed at {step} (attempt {attempt}): {message}");
                out.push(self.server_record("server_failed", &server, reason.clone()));
                if self.direction == Direction::Backward
                    && direction == Direction::Forward
                    && !self.status.is_terminal()
                {
                    // It failed on its way forward while the pool rolls back: roll it back too.
                    self.join_rollback(&server, out);
                } else {
                    self.apply_failure(direction, reason, out);
                }
            }
            Outcome::Unknown { .. } => {
                let phase = ServerPhase::Unanswered {
                    step,
                    attempt,
                    message: message.clone(),
                };
                self.set_phase(&server, phase, direction);
                let reason = format!(
                    "server {server}: no answer to {step} (attempt {attempt}): {message}; \
                     resume asks its agent again"
                );
                out.push(self.server_record("step_unanswered", &server, reason.clone()));
                if self.status.is_active() {
                    self.status = Status::Paused { reason };
                    out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
                }
            }
        }
    }

    /// A forward server whose step (not a prepare: see `on_step_done`) ended while the pool
    /// rolls back: it was touched, so it joins the backward pass.
    fn join_rollback(&mut self, server: &str, out: &mut Vec<Action>) {
        self.set_phase(server, ServerPhase::Pending, Direction::Backward);
        out.push(self.server_record(
            "server_joins_rollback",
            server,
            "its forward chain stopped; it is rolled back with its domain".to_string(),
        ));
    }

    fn apply_failure(&mut self, direction: Direction, reason: String, out: &mut Vec<Action>) {
        if self.status.is_terminal() {
            return;
        }
        match direction {
            Direction::Restore => {}
            Direction::Backward => {
                // Rolling back a rollback would loop; a human has to look. Servers it left
                // down are restored on what they run now.
                self.status = Status::Failed { reason };
                out.push(self.record(
                    "failed",
                    None,
                    None,
                    format!("rollback failed: {}", self.status),
                ));
            }
            Direction::Forward => match self.plan.on_failure {
                FailureAction::Pause => {
                    if !self.status.is_terminal() {
                        self.status = Status::Paused { reason };
                        out.push(self.record(
                            "paused",
                            None,
                            None,
                            format!("upgrade {}", self.status),
                        ));
                    }
                }
                FailureAction::Rollback => self.begin_rollback(reason, false, out),
            },
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
            return;
        }
        self.domain_phase = DomainPhase::InProgress;
        if ok {
            self.failed_over = true;
            out.push(
                self.domain_record("failover_succeeded", format!("pool failed over: {message}")),
            );
        } else {
            // Resume asks readiness once more and, if the pool is still in trouble, fails over
            // again after one answer: the busy budget is already spent.
            self.busy_answers = self.plan.busy_retries.saturating_sub(1);
            let reason = format!("failover to paired pool failed: {message}");
            out.push(self.domain_record("failover_failed", reason.clone()));
            if self.status.is_active() {
                self.status = Status::Paused { reason };
                out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
            }
        }
    }

    fn on_soak_done(&mut self, out: &mut Vec<Action>) {
        if self.domain_phase != DomainPhase::Soaking || self.status.is_terminal() {
            out.push(
                self.domain_record("ignored", "ignored a soak end nobody waits for".to_string()),
            );
            return;
        }
        out.push(self.domain_record("soak_done", "canary soak finished".to_string()));
        self.domain_phase = DomainPhase::InProgress;
        self.enter_next_domain(out);
    }

    fn on_window_open(&mut self, out: &mut Vec<Action>) {
        if self.domain_phase != DomainPhase::AwaitingWindow || self.status.is_terminal() {
            out.push(self.domain_record(
                "ignored",
                "ignored a window opening nobody waits for".to_string(),
            ));
            return;
        }
        out.push(self.domain_record(
            "window_open",
            "a maintenance window is open: the domain starts".to_string(),
        ));
        self.domain_phase = DomainPhase::InProgress;
        self.enter_domain_now(out);
    }

    fn on_internal(&mut self, message: String, out: &mut Vec<Action>) {
        // The check whose answer will never come is no longer outstanding: Resume asks again.
        self.readiness_outstanding = None;
        let reason = format!("internal error: {message}; resume retries");
        out.push(self.record("internal_error", None, None, reason.clone()));
        if self.status.is_active() {
            self.status = Status::Paused { reason };
            out.push(self.record("paused", None, None, format!("upgrade {}", self.status)));
        }
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
        if let Err(e) = self.plan.validate() {
            let message = format!("resume by {by} refused: the plan cannot be executed: {e}");
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.resume_count = self.resume_count.saturating_add(1);
        self.status = match self.direction {
            Direction::Backward => Status::RollingBack {
                reason: format!("rollback resumed by {by}"),
            },
            _ => Status::Running,
        };
        out.push(self.record("resumed", None, None, format!("resumed by {by}")));
        self.reissue_unanswered(out);
        if self.gate_open() && !self.failed_over && self.readiness_outstanding.is_none() {
            // An operator resuming has looked at the pool: ask at once, not after the interval.
            self.ask_readiness(Duration::ZERO, out);
        }
    }

    /// Steps whose answer never came are asked again under the same operation id: the agent
    /// answers from its journal, adopts the run, or runs it if it never arrived.
    fn reissue_unanswered(&mut self, out: &mut Vec<Action>) {
        let unanswered: Vec<(String, Step, u32, Direction)> = self
            .servers
            .iter()
            .filter_map(|(s, p)| match p.phase {
                ServerPhase::Unanswered { step, attempt, .. } => {
                    Some((s.clone(), step, attempt, p.direction))
                }
                _ => None,
            })
            .collect();
        for (server, step, attempt, direction) in unanswered {
            self.set_phase(&server, ServerPhase::InFlight { step, attempt }, direction);
            let op_id = Self::op_id(&self.plan.id, &server, direction, step, attempt);
            out.push(self.server_record(
                "step_started",
                &server,
                format!("{step} asked again (attempt {attempt}, op {op_id})"),
            ));
            out.push(Action::RunStep {
                server,
                step,
                direction,
                op_id,
                attempt,
            });
        }
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
            "aborted by {by}; {} in-flight server(s) finish their chain, servers left out of \
             service are restored",
            self.in_flight()
        );
        out.push(self.record("aborted", None, None, message));
    }

    fn on_rollback(&mut self, by: String, out: &mut Vec<Action>) {
        let forward = self.direction == Direction::Forward;
        if !forward || !matches!(self.status, Status::Running | Status::Paused { .. }) {
            let message = format!(
                "rollback by {by} ignored: upgrade is {} ({})",
                self.status.name(),
                self.direction.name()
            );
            out.push(self.record("ignored", None, None, message));
            return;
        }
        self.begin_rollback(format!("rollback requested by {by}"), true, out);
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
        let mut touched = Vec::new();
        let mut untouched = Vec::new();
        for (s, p) in &self.servers {
            if p.direction != Direction::Forward {
                continue;
            }
            match &p.phase {
                ServerPhase::Done => touched.push(s.clone()),
                ServerPhase::Failed { step, .. } if step.takes_down() => touched.push(s.clone()),
                // A prepare changes nothing on the server: one whose answer never came is not
                // asked again for a pass that is over.
                ServerPhase::Failed { .. }
                | ServerPhase::Prepared
                | ServerPhase::Unanswered {
                    step: Step::Prepare,
                    ..
                } => untouched.push(s.clone()),
                _ => {}
            }
        }
        for server in touched {
            self.set_phase(&server, ServerPhase::Pending, Direction::Backward);
        }
        for server in untouched {
            self.set_phase(&server, ServerPhase::Pending, Direction::Forward);
        }
        self.readiness_outstanding = None;
        self.busy_answers = 0;
        if self.status.is_active() {
            self.reissue_unanswered(out);
        }
        // A failover in progress keeps running: its result says where the traffic is. A
        // rollback waits for no soak and no maintenance window.
        if matches!(
            self.domain_phase,
            DomainPhase::Soaking | DomainPhase::AwaitingWindow
        ) {
            self.domain_phase = DomainPhase::InProgress;
        }
    }

    fn exhausted(&mut self, why: String, out: &mut Vec<Action>) {
        out.push(self.domain_record("exhausted", format!("pool not ready: {why}")));
        self.busy_answers = 0;
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

    /// Moves the upgrade along as far as the state allows: completes domains, prepares
    /// servers, launches retries, gates each server on readiness before it goes down, and
    /// once the run has ended, restores the servers it left out of service.
    fn settle(&mut self, out: &mut Vec<Action>) {
        // Each round either returns or moves a domain forward, so this bound is never reached
        // on a consistent state; it only guards a corrupt one.
        let rounds = self.plan.domains.len().saturating_mul(3).saturating_add(3);
        for _ in 0..rounds {
            if self.status.is_terminal() {
                self.restore(out);
                return;
            }
            if self.domain_phase != DomainPhase::InProgress {
                return;
            }
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

    fn ask_readiness(&mut self, after: Duration, out: &mut Vec<Action>) {
        let Some(domain) = self.current_domain().map(str::to_string) else {
            return;
        };
        self.readiness_outstanding = Some(self.domain_index);
        self.readiness_asked = self.readiness_asked.saturating_add(1);
        out.push(Action::CheckReadiness {
            id: self.readiness_asked,
            domain,
            after,
        });
    }

    fn finish_domain(&mut self, out: &mut Vec<Action>) {
        match self.direction {
            Direction::Forward | Direction::Restore => {
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
            Direction::Forward | Direction::Restore => {
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
        self.enter_domain(out);
    }

    /// Enters the current domain; a forward domain with work waits for a maintenance window
    /// first when the plan names some.
    fn enter_domain(&mut self, out: &mut Vec<Action>) {
        self.busy_answers = 0;
        if self.direction == Direction::Forward
            && !self.plan.windows.is_empty()
            && self.domain_has_work()
        {
            self.domain_phase = DomainPhase::AwaitingWindow;
            let windows: Vec<String> = self.plan.windows.iter().map(ToString::to_string).collect();
            out.push(self.domain_record(
                "awaiting_window",
                format!(
                    "the domain starts only in a maintenance window ({})",
                    windows.join("; ")
                ),
            ));
            if let Some(domain) = self.current_domain() {
                out.push(Action::AwaitWindow {
                    domain: domain.to_string(),
                });
            }
            return;
        }
        self.enter_domain_now(out);
    }

    fn enter_domain_now(&mut self, out: &mut Vec<Action>) {
        self.domain_phase = DomainPhase::InProgress;
        self.busy_answers = 0;
        if self.domain_has_work() {
            let what = match self.direction {
                Direction::Backward => "rollback",
                _ => "upgrade",
            };
            out.push(self.domain_record("domain_started", format!("domain {what} started")));
        }
    }

    fn domain_servers(&self) -> Vec<String> {
        self.servers_of_domain(self.domain_index)
    }

    /// The servers of domain `index` (none past the last), sorted.
    fn servers_of_domain(&self, index: usize) -> Vec<String> {
        let mut names = self
            .plan
            .domains
            .get(index)
            .map(|d| d.servers.clone())
            .unwrap_or_default();
        names.sort();
        names.dedup();
        names
    }

    /// Whether the current domain still has anything to do in the current direction.
    fn domain_has_work(&self) -> bool {
        self.domain_servers().iter().any(|s| {
            self.servers.get(s).is_some_and(|p| match self.direction {
                Direction::Forward | Direction::Restore => p.phase != ServerPhase::Done,
                Direction::Backward => match p.direction {
                    Direction::Backward => p.phase != ServerPhase::Done,
                    // A forward chain still finishing (or waiting for its answer) joins the
                    // rollback when it ends.
                    _ => matches!(
                        p.phase,
                        ServerPhase::InFlight { .. } | ServerPhase::Unanswered { .. }
                    ),
                },
            })
        })
    }

    /// Servers of the current domain that are down or going down because of this pass, and
    /// servers being prepared or prepared for this pass (each kind is bounded by
    /// `parallelism`). A forward prepare still out when a rollback starts (one prepared ahead,
    /// see [`Upgrade::prepare_ahead`]) does not hold up the rollback's own.
    fn slots(&self) -> (usize, usize) {
        let mut down = 0;
        let mut preparing = 0;
        for p in self.servers.values() {
            match &p.phase {
                ServerPhase::InFlight { step, .. } | ServerPhase::Unanswered { step, .. } => {
                    if step.takes_down() {
                        down += 1;
                    } else if p.direction == self.direction {
                        preparing += 1;
                    }
                }
                ServerPhase::Prepared if p.direction == self.direction => preparing += 1,
                ServerPhase::Failed { step, .. }
                    if step.takes_down() && p.direction == self.direction =>
                {
                    down += 1;
                }
                // A failed prepare keeps its slot for its retry, as a failed chain keeps its
                // down slot: a prepare ahead must not take it meanwhile.
                ServerPhase::Failed { .. } if p.direction == self.direction => preparing += 1,
                _ => {}
            }
        }
        let cap = self.plan.parallelism as usize;
        (cap.saturating_sub(down), cap.saturating_sub(preparing))
    }

    fn retry_attempt(&self) -> u32 {
        self.plan
            .server_retries
            .saturating_add(1)
            .saturating_add(self.resume_count)
    }

    /// Fills the current domain's free slots: failed servers first (only a Resume makes them
    /// launchable again: a failure pauses), then prepares pending ones, then opens the gate for
    /// a prepared one.
    fn launch(&mut self, out: &mut Vec<Action>) {
        let names = self.domain_servers();
        let attempt = self.retry_attempt();
        // Failed servers of this pass are retried where they failed: a server already down
        // needs no readiness gate to be worked on again.
        let failed: Vec<(String, Step)> = names
            .iter()
            .filter_map(|s| {
                let p = self.servers.get(s)?;
                match &p.phase {
                    ServerPhase::Failed { step, .. } if p.direction == self.direction => {
                        Some((s.clone(), *step))
                    }
                    _ => None,
                }
            })
            .collect();
        for (server, step) in failed {
            // Its down slot is already counted while it is failed.
            self.run_step(&server, step, attempt, out);
        }
        // With the traffic on the paired pool, prepared servers go down without a gate.
        if self.failed_over {
            while self.gate_open() {
                let Some(server) = self.next_prepared() else {
                    break;
                };
                self.take_down(&server, out);
            }
        }
        let (_, prepare_slots) = self.slots();
        let left = self.prepare_pending(&names, prepare_slots, out);
        self.prepare_ahead(&names, left, out);
        if !self.failed_over && self.gate_open() && self.readiness_outstanding.is_none() {
            let after = if self.busy_answers > 0 {
                self.plan.busy_retry_interval
            } else {
                Duration::ZERO
            };
            self.ask_readiness(after, out);
        }
    }

    /// Prepares the next domain's servers while this one works, once none of this domain's
    /// waits for a prepare: its first server can then go down as soon as the domain starts,
    /// instead of after a prepare (B1: the time between domains). A prepare fetches and checks
    /// the artifact; nothing goes down, and the next domain's readiness gate and its one
    /// domain at a time are unchanged. Forward only, and not when the plan has maintenance
    /// windows (nothing happens to a domain before its window opens). A rollback puts a
    /// prepared server that was never touched back to pending.
    fn prepare_ahead(&mut self, current: &[String], slots: usize, out: &mut Vec<Action>) {
        if slots == 0 || self.direction != Direction::Forward || !self.plan.windows.is_empty() {
            return;
        }
        // Not while this domain has a server to prepare, or one that failed: its retry (on
        // resume) takes a prepare slot first.
        let failed = |s: &String| {
            self.servers
                .get(s)
                .is_some_and(|p| matches!(p.phase, ServerPhase::Failed { .. }))
        };
        if current.iter().any(|s| self.is_pending(s) || failed(s)) {
            return;
        }
        let next = self.servers_of_domain(self.domain_index.saturating_add(1));
        self.prepare_pending(&next, slots, out);
    }

    /// Whether `server` waits for its prepare in this pass.
    fn is_pending(&self, server: &str) -> bool {
        self.servers
            .get(server)
            .is_some_and(|p| p.phase == ServerPhase::Pending && p.direction == self.direction)
    }

    /// Prepares the pending ones of `names`, in order, while `slots` last; returns the slots
    /// left.
    fn prepare_pending(
        &mut self,
        names: &[String],
        mut slots: usize,
        out: &mut Vec<Action>,
    ) -> usize {
        for server in names {
            if slots == 0 {
                break;
            }
            if self.is_pending(server) {
                self.run_step(server, Step::Prepare, 1, out);
                slots -= 1;
            }
        }
        slots
    }

    /// A prepared server waits and a down slot is free.
    fn gate_open(&self) -> bool {
        self.next_prepared().is_some() && self.slots().0 > 0
    }

    fn next_prepared(&self) -> Option<String> {
        self.domain_servers().into_iter().find(|s| {
            self.servers
                .get(s)
                .is_some_and(|p| p.phase == ServerPhase::Prepared && p.direction == self.direction)
        })
    }

    fn take_down(&mut self, server: &str, out: &mut Vec<Action>) {
        let step = self.plan.down_step();
        self.run_step(server, step, 1, out);
    }

    /// Once the run has ended, servers it left out of service (a chain failed after taking
    /// them down) are brought back on what they run now: restart and verify, or only verify
    /// when that is what failed. A restore that fails is shown, not retried forever.
    fn restore(&mut self, out: &mut Vec<Action>) {
        let restoring = self
            .servers
            .values()
            .filter(|p| {
                p.direction == Direction::Restore && matches!(p.phase, ServerPhase::InFlight { .. })
            })
            .count();
        let mut slots = (self.plan.parallelism as usize).saturating_sub(restoring);
        let candidates: Vec<(String, Step)> = self
            .plan
            .servers()
            .filter_map(|s| {
                let p = self.servers.get(s)?;
                if !p.down {
                    return None;
                }
                match &p.phase {
                    ServerPhase::Failed { step, .. } if p.direction != Direction::Restore => {
                        let first = if *step == Step::Verify {
                            Step::Verify
                        } else {
                            Step::Restart
                        };
                        Some((s.clone(), first))
                    }
                    ServerPhase::Pending | ServerPhase::Prepared => {
                        Some((s.clone(), Step::Restart))
                    }
                    _ => None,
                }
            })
            .collect();
        for (server, step) in candidates {
            if slots == 0 {
                break;
            }
            self.set_phase(&server, ServerPhase::Pending, Direction::Restore);
            out.push(self.server_record(
                "restore_started",
                &server,
                "bringing it back into service on what it runs now".to_string(),
            ));
            self.run_step(&server, step, 1, out);
            slots -= 1;
        }
        // Prepared servers never went down: nothing to undo.
        let prepared: Vec<(String, Direction)> = self
            .servers
            .iter()
            .filter(|(_, p)| p.phase == ServerPhase::Prepared)
            .map(|(s, p)| (s.clone(), p.direction))
            .collect();
        for (server, direction) in prepared {
            self.set_phase(&server, ServerPhase::Pending, direction);
        }
    }

    fn run_step(&mut self, server: &str, step: Step, attempt: u32, out: &mut Vec<Action>) {
        let direction = self
            .servers
            .get(server)
            .map_or(self.direction, |p| p.direction);
        self.set_phase(server, ServerPhase::InFlight { step, attempt }, direction);
        if step.takes_down() {
            if let Some(p) = self.servers.get_mut(server) {
                p.down = true;
            }
        }
        let op_id = Self::op_id(&self.plan.id, server, direction, step, attempt);
        let message = format!("{step} started (attempt {attempt}, op {op_id})");
        out.push(self.server_record("step_started", server, message));
        out.push(Action::RunStep {
            server: server.to_string(),
            step,
            direction,
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
        Event::WindowOpen => "maintenance window open".to_string(),
        Event::Readiness { state, .. } => format!("readiness answer {state:?}"),
        Event::StepDone {
            server,
            step,
            attempt,
            outcome,
        } => format!("{step} result for {server} (attempt {attempt}): {outcome:?}"),
        Event::FailoverDone { ok, .. } => format!("failover result (ok: {ok})"),
        Event::SoakDone => "soak end".to_string(),
        Event::Internal { message } => format!("internal error: {message}"),
        Event::Pause { by } => format!("pause by {by}"),
        Event::Resume { by } => format!("resume by {by}"),
        Event::Abort { by } => format!("abort by {by}"),
        Event::Rollback { by } => format!("rollback by {by}"),
    }
}
