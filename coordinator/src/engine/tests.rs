//! Table tests: one scenario per policy, with the exact actions asserted where order matters.

use super::*;
use std::collections::VecDeque;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

pub(super) fn plan(domains: &[(&str, &[&str])]) -> Plan {
    Plan {
        id: "p1".into(),
        pool: "pool-a".into(),
        version: "2.0".into(),
        artifact: "https://repo/app-2.0.tar.gz".into(),
        sha256: "ab".repeat(32),
        drain: DrainMode::Graceful { timeout: 5 * MIN },
        parallelism: 1,
        verify_stable: Duration::from_secs(10),
        verify_timeout: 2 * MIN,
        busy_retry_interval: DEFAULT_BUSY_RETRY_INTERVAL,
        busy_retries: DEFAULT_BUSY_RETRIES,
        on_exhausted: ExhaustedAction::Pause,
        server_retries: 0,
        on_failure: FailureAction::Pause,
        domains: domains
            .iter()
            .map(|(name, servers)| Domain {
                name: name.to_string(),
                servers: servers.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        canary_soak: None,
        paired_pool: None,
    }
}

fn three_by_two() -> Plan {
    // Listed out of name order on purpose: servers launch in name order.
    plan(&[
        ("ud1", &["fe-1b", "fe-1a"]),
        ("ud2", &["fe-2a", "fe-2b"]),
        ("ud3", &["fe-3b", "fe-3a"]),
    ])
}

fn ready() -> Event {
    Event::Readiness {
        state: PoolState::Ready,
        domain_ready: true,
        reason: "ok".into(),
    }
}

fn readiness(state: PoolState, domain_ready: bool) -> Event {
    Event::Readiness {
        state,
        domain_ready,
        reason: "test".into(),
    }
}

fn done(server: &str, step: Step, attempt: u32, ok: bool) -> Event {
    Event::StepDone {
        server: server.into(),
        step,
        attempt,
        ok,
        message: if ok { "ok".into() } else { "boom".into() },
    }
}

fn op(who: &str) -> String {
    who.to_string()
}

/// The usual answer to an action: everything succeeds, the pool is always ready.
fn ok_answer(action: &Action) -> Option<Event> {
    match action {
        Action::CheckReadiness { .. } => Some(ready()),
        Action::RunStep {
            server,
            step,
            attempt,
            ..
        } => Some(done(server, *step, *attempt, true)),
        Action::Failover { .. } => Some(Event::FailoverDone {
            ok: true,
            message: "ok".into(),
        }),
        Action::Soak { .. } => Some(Event::SoakDone),
        Action::Record { .. } | Action::Finished { .. } => None,
    }
}

/// A FIFO driver: work actions are answered in the order they were issued.
struct Run {
    up: Option<Upgrade>,
    queue: VecDeque<Action>,
    log: Vec<Action>,
}

impl Run {
    fn new(plan: Plan) -> Run {
        let (up, actions) = Upgrade::new(plan).expect("valid plan");
        let mut run = Run {
            up: Some(up),
            queue: VecDeque::new(),
            log: Vec::new(),
        };
        run.absorb(actions);
        run
    }

    fn up(&self) -> &Upgrade {
        self.up.as_ref().expect("upgrade present")
    }

    fn absorb(&mut self, actions: Vec<Action>) -> Vec<Action> {
        for a in &actions {
            if !matches!(a, Action::Record { .. } | Action::Finished { .. }) {
                self.queue.push_back(a.clone());
            }
        }
        self.log.extend(actions.iter().cloned());
        actions
    }

    /// Feeds one event and returns the work actions (no records) it produced.
    fn feed(&mut self, event: Event) -> Vec<Action> {
        let up = self.up.take().expect("upgrade present");
        let (up, actions) = up.step(event);
        self.up = Some(up);
        work(&self.absorb(actions))
    }

    /// Removes and returns the oldest queued work action.
    fn next(&mut self) -> Action {
        self.queue.pop_front().expect("a queued action")
    }

    /// Answers the oldest queued action with `ok_answer`.
    fn answer_next(&mut self) -> Vec<Action> {
        let action = self.next();
        let event = ok_answer(&action).expect("answerable");
        self.feed(event)
    }

    /// Answers queued actions in order, with `answer` where it has an opinion, `ok_answer`
    /// otherwise, until nothing is queued.
    fn run_with(&mut self, mut answer: impl FnMut(&Action) -> Option<Event>) {
        for _ in 0..10_000 {
            let Some(action) = self.queue.pop_front() else {
                return;
            };
            let event = answer(&action)
                .or_else(|| ok_answer(&action))
                .expect("answerable");
            self.feed(event);
        }
        panic!("run did not settle");
    }

    fn run_ok(&mut self) {
        self.run_with(|_| None);
    }

    fn run_steps(&self) -> Vec<(String, Step)> {
        steps(&self.log)
    }

    fn finished(&self) -> Vec<Status> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Finished { status } => Some(status.clone()),
                _ => None,
            })
            .collect()
    }

    fn checks(&self) -> Vec<(String, Duration)> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::CheckReadiness { domain, after } => Some((domain.clone(), *after)),
                _ => None,
            })
            .collect()
    }

    fn phase(&self, server: &str) -> ServerPhase {
        self.up().servers[server].phase.clone()
    }
}

fn work(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Record { .. }))
        .cloned()
        .collect()
}

fn steps(actions: &[Action]) -> Vec<(String, Step)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RunStep { server, step, .. } => Some((server.clone(), *step)),
            _ => None,
        })
        .collect()
}

fn chain(server: &str, steps: &[Step]) -> Vec<(String, Step)> {
    steps.iter().map(|s| (server.to_string(), *s)).collect()
}

const FWD: [Step; 4] = [Step::Drain, Step::Install, Step::Restart, Step::Verify];
const BWD: [Step; 4] = [Step::Drain, Step::Rollback, Step::Restart, Step::Verify];

fn run_step(server: &str, step: Step, attempt: u32, direction: Direction) -> Action {
    Action::RunStep {
        server: server.into(),
        step,
        op_id: Upgrade::op_id("p1", server, direction, step, attempt),
        attempt,
    }
}

fn check(domain: &str, after: Duration) -> Action {
    Action::CheckReadiness {
        domain: domain.into(),
        after,
    }
}

#[test]
fn new_starts_waiting_on_first_domain() {
    let (up, actions) = Upgrade::new(three_by_two()).expect("valid");
    assert_eq!(up.status, Status::Running);
    assert_eq!(up.direction, Direction::Forward);
    assert_eq!(up.domain_index, 0);
    assert_eq!(
        up.domain_phase,
        DomainPhase::WaitingReady { busy_answers: 0 }
    );
    assert!(up.servers.values().all(|p| p.phase == ServerPhase::Pending));
    assert_eq!(actions.len(), 2);
    assert!(matches!(&actions[0], Action::Record { kind, .. } if kind == "upgrade_started"));
    assert_eq!(actions[1], check("ud1", Duration::ZERO));
}

#[test]
fn happy_path_parallelism_1() {
    let mut run = Run::new(three_by_two());
    run.run_ok();
    let mut expected = Vec::new();
    for s in ["fe-1a", "fe-1b", "fe-2a", "fe-2b", "fe-3a", "fe-3b"] {
        expected.extend(chain(s, &FWD));
    }
    assert_eq!(run.run_steps(), expected);
    assert_eq!(run.up().status, Status::Completed);
    assert!(run.up().is_terminal());
    assert!(run
        .up()
        .servers
        .values()
        .all(|p| p.phase == ServerPhase::Done));
    assert_eq!(run.finished(), vec![Status::Completed]);
    let zero = Duration::ZERO;
    assert_eq!(
        run.checks(),
        vec![
            ("ud1".into(), zero),
            ("ud2".into(), zero),
            ("ud3".into(), zero)
        ]
    );
}

#[test]
fn happy_path_parallelism_2() {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.run_ok();
    let mut expected = Vec::new();
    for (a, b) in [("fe-1a", "fe-1b"), ("fe-2a", "fe-2b"), ("fe-3a", "fe-3b")] {
        for step in FWD {
            expected.push((a.to_string(), step));
            expected.push((b.to_string(), step));
        }
    }
    assert_eq!(run.run_steps(), expected);
    assert_eq!(run.up().status, Status::Completed);
    assert_eq!(run.finished(), vec![Status::Completed]);
}

#[test]
fn first_step_has_deterministic_op_id() {
    let mut run = Run::new(three_by_two());
    run.next();
    let actions = run.feed(ready());
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Drain, 1, Direction::Forward)]
    );
    assert!(
        matches!(&actions[0], Action::RunStep { op_id, .. } if op_id == "p1/fe-1a/fwd/drain/1")
    );
    assert_eq!(run.up().domain_phase, DomainPhase::InProgress);
}

#[test]
fn busy_once_then_ready() {
    let mut run = Run::new(three_by_two());
    run.next();
    let actions = run.feed(readiness(PoolState::Busy, false));
    assert_eq!(actions, vec![check("ud1", DEFAULT_BUSY_RETRY_INTERVAL)]);
    assert_eq!(
        run.up().domain_phase,
        DomainPhase::WaitingReady { busy_answers: 1 }
    );
    run.next();
    let actions = run.feed(ready());
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Drain, 1, Direction::Forward)]
    );
}

#[test]
fn ready_pool_with_unready_domain_counts_as_busy() {
    let mut run = Run::new(three_by_two());
    run.next();
    let actions = run.feed(readiness(PoolState::Ready, false));
    assert_eq!(actions, vec![check("ud1", DEFAULT_BUSY_RETRY_INTERVAL)]);
    assert_eq!(
        run.up().domain_phase,
        DomainPhase::WaitingReady { busy_answers: 1 }
    );
}

/// Answers the first readiness check and the next `busy_retries - 1` with Busy.
fn exhaust_with_busy(run: &mut Run) -> Vec<Action> {
    let mut last = Vec::new();
    for i in 0..DEFAULT_BUSY_RETRIES {
        assert!(
            matches!(run.next(), Action::CheckReadiness { .. }),
            "check {i}"
        );
        last = run.feed(readiness(PoolState::Busy, false));
    }
    last
}

#[test]
fn busy_three_times_fails_over_then_skips_readiness() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Failover;
    plan.paired_pool = Some("pool-b".into());
    let mut run = Run::new(plan);
    let actions = exhaust_with_busy(&mut run);
    assert_eq!(
        actions,
        vec![Action::Failover {
            pool: "pool-a".into(),
            paired: "pool-b".into()
        }]
    );
    assert_eq!(run.up().domain_phase, DomainPhase::FailingOver);
    assert_eq!(run.checks().len(), 3, "initial check and two retries");
    run.next();
    let actions = run.feed(Event::FailoverDone {
        ok: true,
        message: "done".into(),
    });
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Drain, 1, Direction::Forward)]
    );
    assert!(run.up().failed_over);
    assert_eq!(run.up().domain_phase, DomainPhase::InProgress);
    run.run_ok();
    assert_eq!(run.checks().len(), 3, "no readiness asked once failed over");
    assert_eq!(run.up().status, Status::Completed);
    assert_eq!(run.run_steps().len(), 6 * 4);
}

#[test]
fn failed_failover_pauses_and_resume_asks_again_then_fails_over_at_once() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Failover;
    plan.paired_pool = Some("pool-b".into());
    let mut run = Run::new(plan);
    exhaust_with_busy(&mut run);
    run.next();
    let actions = run.feed(Event::FailoverDone {
        ok: false,
        message: "hook exited 1".into(),
    });
    assert_eq!(actions, vec![]);
    assert!(
        matches!(&run.up().status, Status::Paused { reason } if reason.contains("hook exited 1"))
    );
    assert!(!run.up().failed_over);
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    run.next();
    let actions = run.feed(readiness(PoolState::Busy, false));
    assert!(matches!(actions.as_slice(), [Action::Failover { .. }]));
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn busy_three_times_pauses_and_resume_asks_again() {
    let mut run = Run::new(three_by_two());
    let actions = exhaust_with_busy(&mut run);
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert!(run.queue.is_empty());
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn busy_three_times_aborts() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Abort;
    let mut run = Run::new(plan);
    let actions = exhaust_with_busy(&mut run);
    assert!(matches!(
        actions.as_slice(),
        [Action::Finished {
            status: Status::Aborted { .. }
        }]
    ));
    assert!(run.up().is_terminal());
    assert!(run.run_steps().is_empty());
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![]);
    assert_eq!(run.finished().len(), 1);
}

#[test]
fn insufficient_front_ends_exhausts_at_once() {
    for (action, paused) in [
        (ExhaustedAction::Pause, true),
        (ExhaustedAction::Abort, false),
    ] {
        let mut plan = three_by_two();
        plan.on_exhausted = action;
        let mut run = Run::new(plan);
        run.next();
        run.feed(readiness(PoolState::InsufficientActiveFrontEnds, false));
        assert_eq!(matches!(run.up().status, Status::Paused { .. }), paused);
        assert_eq!(matches!(run.up().status, Status::Aborted { .. }), !paused);
        assert_eq!(run.checks().len(), 1);
    }
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Failover;
    plan.paired_pool = Some("pool-b".into());
    let mut run = Run::new(plan);
    run.next();
    let actions = run.feed(readiness(PoolState::InsufficientActiveFrontEnds, false));
    assert!(matches!(actions.as_slice(), [Action::Failover { .. }]));
}

#[test]
fn verify_failure_retried_then_succeeds() {
    let mut plan = three_by_two();
    plan.server_retries = 1;
    let mut run = Run::new(plan);
    let mut failed_once = false;
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Verify,
            attempt,
            op_id,
        } if server == "fe-2a" => {
            if *attempt == 1 {
                failed_once = true;
                Some(done(server, Step::Verify, 1, false))
            } else {
                assert_eq!(op_id, "p1/fe-2a/fwd/verify/2");
                None
            }
        }
        _ => None,
    });
    assert!(failed_once);
    let mut expected = Vec::new();
    for s in ["fe-1a", "fe-1b"] {
        expected.extend(chain(s, &FWD));
    }
    expected.extend(chain("fe-2a", &FWD));
    expected.push(("fe-2a".into(), Step::Verify));
    for s in ["fe-2b", "fe-3a", "fe-3b"] {
        expected.extend(chain(s, &FWD));
    }
    assert_eq!(run.run_steps(), expected);
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn verify_failure_exhausted_pauses_and_resume_retries_with_new_attempt() {
    let mut plan = three_by_two();
    plan.server_retries = 1;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Verify,
            attempt,
            ..
        } if server == "fe-1a" && *attempt <= 2 => {
            Some(done(server, Step::Verify, *attempt, false))
        }
        _ => None,
    });
    assert!(matches!(&run.up().status, Status::Paused { reason } if reason.contains("fe-1a")));
    assert_eq!(
        run.phase("fe-1a"),
        ServerPhase::Failed {
            step: Step::Verify,
            message: "boom".into()
        }
    );
    assert_eq!(
        run.phase("fe-1b"),
        ServerPhase::Pending,
        "nothing launched after the failure"
    );
    assert!(run.queue.is_empty());
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Verify, 3, Direction::Forward)]
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert_eq!(run.finished(), vec![Status::Completed]);
}

#[test]
fn failure_rolls_back_touched_servers_in_reverse_domain_order() {
    let mut plan = plan(&[
        ("ud1", &["a1", "a2"]),
        ("ud2", &["b1", "b2", "b3"]),
        ("ud3", &["c1", "c2"]),
    ]);
    plan.on_failure = FailureAction::Rollback;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Install,
            attempt,
            ..
        } if server == "b2" => Some(done(server, Step::Install, *attempt, false)),
        _ => None,
    });
    assert_eq!(run.up().status, Status::RolledBack);
    assert_eq!(run.finished(), vec![Status::RolledBack]);
    let log = run.log.clone();
    let started = log
        .iter()
        .position(|a| matches!(a, Action::Record { kind, .. } if kind == "rollback_started"))
        .expect("rollback recorded");
    let mut expected = Vec::new();
    for s in ["b1", "b2", "a1", "a2"] {
        expected.extend(chain(s, &BWD));
    }
    assert_eq!(steps(&log[started..]), expected);
    let after: Vec<_> = run.checks().into_iter().skip(2).map(|(d, _)| d).collect();
    assert_eq!(after, vec!["ud2".to_string(), "ud1".to_string()]);
    for s in ["a1", "a2", "b1", "b2"] {
        assert_eq!(run.up().servers[s].direction, Direction::Backward);
        assert_eq!(run.phase(s), ServerPhase::Done);
    }
    for s in ["b3", "c1", "c2"] {
        assert_eq!(run.up().servers[s].direction, Direction::Forward);
        assert_eq!(run.phase(s), ServerPhase::Pending);
    }
    assert!(run
        .run_steps()
        .iter()
        .all(|(s, _)| !["b3", "c1", "c2"].contains(&s.as_str())));
    assert!(log
        .iter()
        .any(|a| matches!(a, Action::RunStep { op_id, .. } if op_id == "p1/a1/bwd/rollback/1")));
}

#[test]
fn rollback_event_waits_for_in_flight_forward_steps() {
    let mut plan = plan(&[("ud1", &["a1", "a2"]), ("ud2", &["b1"])]);
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.answer_next();
    assert_eq!(run.up().in_flight(), 2);
    let actions = run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::RollingBack { .. }));
    assert_eq!(run.up().direction, Direction::Backward);
    let actions = run.answer_next();
    assert_eq!(actions, vec![], "a2 still drains");
    assert_eq!(run.up().servers["a1"].direction, Direction::Backward);
    assert_eq!(run.phase("a1"), ServerPhase::Pending);
    let actions = run.answer_next();
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    let actions = run.answer_next();
    assert_eq!(
        actions,
        vec![
            run_step("a1", Step::Drain, 1, Direction::Backward),
            run_step("a2", Step::Drain, 1, Direction::Backward)
        ]
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
    assert_eq!(run.finished(), vec![Status::RolledBack]);
    assert!(!run
        .run_steps()
        .iter()
        .any(|(s, step)| s == "b1" || *step == Step::Install));
}

#[test]
fn backward_chain_failure_ends_failed_without_looping() {
    let mut plan = plan(&[("ud1", &["a1"]), ("ud2", &["b1"])]);
    plan.on_failure = FailureAction::Rollback;
    plan.server_retries = 1;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step,
            attempt,
            ..
        } if server == "b1" && matches!(step, Step::Install | Step::Rollback) => {
            Some(done(server, *step, *attempt, false))
        }
        _ => None,
    });
    assert!(matches!(&run.up().status, Status::Failed { reason } if reason.contains("b1")));
    assert!(run.up().is_terminal());
    assert_eq!(run.finished().len(), 1);
    let rollbacks = run
        .run_steps()
        .iter()
        .filter(|(_, s)| *s == Step::Rollback)
        .count();
    assert_eq!(rollbacks, 2, "one attempt and one retry");
    assert_eq!(run.up().servers["a1"].direction, Direction::Backward);
    assert_eq!(
        run.phase("a1"),
        ServerPhase::Pending,
        "never rolled back: the upgrade stopped"
    );
}

#[test]
fn pause_lets_in_flight_chain_finish_and_resume_continues() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    let actions = run.feed(Event::Pause { by: op("alice") });
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::Paused { .. }));
    // fe-1a's chain runs to the end: drain -> install -> restart -> verify.
    for step in [Step::Install, Step::Restart, Step::Verify] {
        let actions = run.answer_next();
        assert_eq!(
            actions,
            vec![run_step("fe-1a", step, 1, Direction::Forward)]
        );
    }
    let actions = run.answer_next();
    assert_eq!(actions, vec![], "fe-1b is not launched while paused");
    assert_eq!(run.phase("fe-1a"), ServerPhase::Done);
    assert_eq!(run.phase("fe-1b"), ServerPhase::Pending);
    assert!(run.queue.is_empty());
    assert_eq!(run.feed(Event::Pause { by: op("bob") }), vec![]);
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(
        actions,
        vec![run_step("fe-1b", Step::Drain, 1, Direction::Forward)]
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn pause_at_domain_end_moves_on_but_asks_readiness_only_on_resume() {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.answer_next();
    run.feed(Event::Pause { by: op("alice") });
    while !run.queue.is_empty() {
        run.answer_next();
    }
    assert_eq!(run.up().domain_index, 1);
    assert_eq!(run.up().readiness_outstanding, None);
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud2", Duration::ZERO)]);
}

#[test]
fn pause_while_waiting_ready_drops_the_answer_and_resume_asks_once() {
    let mut run = Run::new(three_by_two());
    run.feed(Event::Pause { by: op("alice") });
    // The outstanding answer arrives while paused: ignored, asked again on resume.
    run.answer_next();
    assert_eq!(
        run.up().domain_phase,
        DomainPhase::WaitingReady { busy_answers: 0 }
    );
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    // Pause and resume before the answer: the check already asked is enough.
    run.feed(Event::Pause { by: op("alice") });
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![]);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert_eq!(run.checks().len(), 4);
}

#[test]
fn abort_with_in_flight_finishes_after_last_chain() {
    let mut plan = plan(&[("ud1", &["a1", "a2", "a3"]), ("ud2", &["b1"])]);
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.answer_next();
    let actions = run.feed(Event::Abort { by: op("alice") });
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::Aborted { .. }));
    assert!(!run.up().is_terminal(), "chains still in flight");
    assert!(run
        .up()
        .resume()
        .iter()
        .all(|a| matches!(a, Action::RunStep { .. })));
    assert_eq!(run.feed(Event::Resume { by: op("alice") }), vec![]);
    run.run_ok();
    assert!(run.up().is_terminal());
    assert_eq!(run.finished().len(), 1);
    assert!(matches!(run.finished()[0], Status::Aborted { .. }));
    let mut expected = Vec::new();
    for step in FWD {
        expected.push(("a1".to_string(), step));
        expected.push(("a2".to_string(), step));
    }
    assert_eq!(run.run_steps(), expected);
    assert!(matches!(run.log.last(), Some(Action::Finished { .. })));
    assert_eq!(run.phase("a3"), ServerPhase::Pending);
}

#[test]
fn abort_without_in_flight_finishes_at_once() {
    let mut run = Run::new(three_by_two());
    let actions = run.feed(Event::Abort { by: op("alice") });
    assert!(
        matches!(actions.as_slice(), [Action::Finished { status: Status::Aborted { reason } }] if reason.contains("alice"))
    );
    assert_eq!(run.up().resume(), vec![]);
}

#[test]
fn stale_and_duplicate_step_results_are_ignored() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    let before = run.up().clone();
    for event in [
        done("fe-1a", Step::Install, 1, true),
        done("fe-1a", Step::Drain, 2, true),
        done("fe-1b", Step::Drain, 1, true),
        done("nobody", Step::Drain, 1, true),
        Event::SoakDone,
        Event::FailoverDone {
            ok: false,
            message: "x".into(),
        },
        ready(),
    ] {
        let actions = run.feed(event);
        assert_eq!(actions, vec![]);
        assert_eq!(run.up(), &before);
    }
    let actions = run.feed(done("fe-1a", Step::Drain, 1, true));
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Install, 1, Direction::Forward)]
    );
    let after = run.up().clone();
    let actions = run.feed(done("fe-1a", Step::Drain, 1, true));
    assert_eq!(actions, vec![], "duplicate");
    assert_eq!(run.up(), &after);
}

#[test]
fn canary_domain_soaks_before_the_next() {
    let mut plan = three_by_two();
    plan.canary_soak = Some(60 * MIN);
    let mut run = Run::new(plan);
    let mut soaks = 0;
    for _ in 0..20 {
        match run.queue.front() {
            Some(Action::Soak { after }) => {
                assert_eq!(*after, 60 * MIN);
                soaks += 1;
                break;
            }
            Some(_) => {
                run.answer_next();
            }
            None => panic!("no soak"),
        }
    }
    assert_eq!(soaks, 1);
    assert_eq!(run.up().domain_phase, DomainPhase::Soaking);
    assert_eq!(run.up().domain_index, 0);
    assert_eq!(run.checks().len(), 1, "next domain waits for the soak");
    assert_eq!(run.feed(ready()), vec![]);
    assert_eq!(run.feed(Event::Pause { by: op("alice") }), vec![]);
    assert_eq!(
        run.feed(Event::Resume { by: op("alice") }),
        vec![],
        "the soak timer is still running"
    );
    let actions = run.answer_next();
    assert_eq!(actions, vec![check("ud2", Duration::ZERO)]);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    let soak_count = run
        .log
        .iter()
        .filter(|a| matches!(a, Action::Soak { .. }))
        .count();
    assert_eq!(soak_count, 1);
}

#[test]
fn canary_soak_skipped_when_nothing_follows() {
    let mut plan = plan(&[("ud1", &["a1"])]);
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert!(!run.log.iter().any(|a| matches!(a, Action::Soak { .. })));
}

#[test]
fn immediate_drain_uses_stop() {
    let mut plan = three_by_two();
    plan.drain = DrainMode::Immediate;
    plan.on_failure = FailureAction::Rollback;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Verify,
            attempt,
            op_id,
        } if server == "fe-2a" && op_id.contains("/fwd/") => {
            Some(done(server, Step::Verify, *attempt, false))
        }
        _ => None,
    });
    let steps = run.run_steps();
    assert!(!steps.iter().any(|(_, s)| *s == Step::Drain));
    assert_eq!(steps[0], ("fe-1a".to_string(), Step::Stop));
    let stops = steps.iter().filter(|(_, s)| *s == Step::Stop).count();
    // 3 forward chains (fe-1a, fe-1b, fe-2a) and 3 backward ones.
    assert_eq!(stops, 6);
    assert_eq!(run.up().status, Status::RolledBack);
}

#[test]
fn plan_validation_errors() {
    type Mutation = fn(&mut Plan);
    let cases: Vec<(Mutation, PlanError, &str)> = vec![
        (
            |p| p.id.clear(),
            PlanError::EmptyField { field: "id" },
            "id",
        ),
        (
            |p| p.pool = " ".into(),
            PlanError::EmptyField { field: "pool" },
            "pool",
        ),
        (
            |p| p.version.clear(),
            PlanError::EmptyField { field: "version" },
            "version",
        ),
        (
            |p| p.sha256.clear(),
            PlanError::EmptyField { field: "sha256" },
            "sha256",
        ),
        (|p| p.domains.clear(), PlanError::NoDomains, "domains"),
        (
            |p| p.domains[1].servers.clear(),
            PlanError::EmptyDomain {
                domain: "ud2".into(),
            },
            "ud2",
        ),
        (
            |p| p.domains[2].servers.push("fe-1a".into()),
            PlanError::DuplicateServer {
                server: "fe-1a".into(),
                first: "ud1".into(),
                second: "ud3".into(),
            },
            "fe-1a",
        ),
        (
            |p| p.domains[2].name = "ud1".into(),
            PlanError::DuplicateDomain {
                domain: "ud1".into(),
            },
            "ud1",
        ),
        (
            |p| p.parallelism = 0,
            PlanError::ZeroParallelism,
            "parallelism",
        ),
        (
            |p| p.busy_retries = 0,
            PlanError::ZeroBusyRetries,
            "busy_retries",
        ),
        (
            |p| p.verify_stable = 3 * MIN,
            PlanError::VerifyStableExceedsTimeout {
                stable: 3 * MIN,
                timeout: 2 * MIN,
            },
            "verify_stable (3m) must not exceed verify_timeout (2m)",
        ),
        (
            |p| p.on_exhausted = ExhaustedAction::Failover,
            PlanError::FailoverWithoutPairedPool,
            "paired_pool",
        ),
        (
            |p| p.domains[0].name.clear(),
            PlanError::EmptyDomainName,
            "domains",
        ),
        (
            |p| p.domains[0].servers[0].clear(),
            PlanError::EmptyServerName {
                domain: "ud1".into(),
            },
            "ud1",
        ),
    ];
    for (mutate, expected, needle) in cases {
        let mut plan = three_by_two();
        mutate(&mut plan);
        let err = plan.validate().expect_err("invalid plan");
        assert_eq!(err, expected);
        let message = err.to_string();
        assert!(message.contains(needle), "{message:?} names {needle}");
        assert_eq!(message, message.to_lowercase(), "lowercase message");
        assert_eq!(Upgrade::new(plan).err(), Some(expected));
    }
    let mut ok = three_by_two();
    ok.on_exhausted = ExhaustedAction::Failover;
    ok.paired_pool = Some("pool-b".into());
    ok.verify_stable = ok.verify_timeout;
    assert_eq!(ok.validate(), Ok(()));
}

#[test]
fn plan_deserializes_with_defaults() {
    let json = r#"{
        "id": "p9", "pool": "pool-a", "version": "2.0", "artifact": "a.tgz", "sha256": "00",
        "drain": {"graceful": {"timeout": "5m"}},
        "verify_stable": "10s", "verify_timeout": "2m",
        "domains": [{"name": "ud1", "servers": ["s1"]}]
    }"#;
    let plan: Plan = serde_json::from_str(json).expect("parses");
    assert_eq!(plan.parallelism, 1);
    assert_eq!(plan.busy_retry_interval, Duration::from_secs(600));
    assert_eq!(plan.busy_retries, 3);
    assert_eq!(plan.server_retries, 0);
    assert_eq!(plan.on_exhausted, ExhaustedAction::Pause);
    assert_eq!(plan.on_failure, FailureAction::Pause);
    assert_eq!(plan.canary_soak, None);
    assert_eq!(plan.drain, DrainMode::Graceful { timeout: 5 * MIN });
    assert_eq!(plan.validate(), Ok(()));
}

#[test]
fn serde_round_trip_mid_run_and_resume_reissues_same_op_ids() -> Result<(), serde_json::Error> {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    run.answer_next(); // ready
    run.answer_next(); // fe-1a drain
    run.answer_next(); // fe-1b drain
    let in_flight: Vec<Action> = run.queue.iter().cloned().collect();
    assert_eq!(
        in_flight,
        vec![
            run_step("fe-1a", Step::Install, 1, Direction::Forward),
            run_step("fe-1b", Step::Install, 1, Direction::Forward)
        ]
    );
    let json = serde_json::to_string(run.up())?;
    let loaded: Upgrade = serde_json::from_str(&json)?;
    assert_eq!(&loaded, run.up());
    assert_eq!(loaded.resume(), in_flight);
    // The new leader carries on from the loaded state.
    run.up = Some(loaded);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);

    // Each waiting phase re-issues what it waits on.
    let mut run = Run::new(three_by_two());
    let json = serde_json::to_string(run.up())?;
    let loaded: Upgrade = serde_json::from_str(&json)?;
    assert_eq!(loaded.resume(), vec![check("ud1", Duration::ZERO)]);
    run.next();
    run.feed(readiness(PoolState::Busy, true));
    assert_eq!(
        run.up().resume(),
        vec![check("ud1", DEFAULT_BUSY_RETRY_INTERVAL)]
    );

    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Failover;
    plan.paired_pool = Some("pool-b".into());
    let mut run = Run::new(plan);
    exhaust_with_busy(&mut run);
    let loaded: Upgrade = serde_json::from_str(&serde_json::to_string(run.up())?)?;
    assert_eq!(
        loaded.resume(),
        vec![Action::Failover {
            pool: "pool-a".into(),
            paired: "pool-b".into()
        }]
    );

    let mut plan = three_by_two();
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    while !matches!(run.queue.front(), Some(Action::Soak { .. })) {
        run.answer_next();
    }
    let loaded: Upgrade = serde_json::from_str(&serde_json::to_string(run.up())?)?;
    assert_eq!(loaded.resume(), vec![Action::Soak { after: MIN }]);

    let mut run = Run::new(three_by_two());
    run.run_ok();
    assert_eq!(run.up().resume(), vec![]);
    Ok(())
}

#[test]
fn terminal_upgrade_ignores_everything() {
    let mut run = Run::new(three_by_two());
    run.run_ok();
    let before = run.up().clone();
    for event in [
        ready(),
        done("fe-1a", Step::Drain, 1, true),
        Event::FailoverDone {
            ok: true,
            message: "x".into(),
        },
        Event::SoakDone,
        Event::Pause { by: op("a") },
        Event::Resume { by: op("a") },
        Event::Abort { by: op("a") },
        Event::Rollback { by: op("a") },
    ] {
        let up = run.up.take().expect("present");
        let (up, actions) = up.step(event);
        assert!(actions.iter().all(|a| matches!(a, Action::Record { .. })));
        assert_eq!(up, before);
        run.up = Some(up);
    }
    assert_eq!(run.finished().len(), 1);
}

#[test]
fn rollback_while_waiting_drops_the_stale_answer_and_asks_for_the_right_domain() {
    let mut run = Run::new(three_by_two());
    for _ in 0..9 {
        run.answer_next(); // ready + 2 chains of 4 steps
    }
    assert_eq!(run.up().domain_index, 1);
    assert_eq!(run.queue.front(), Some(&check("ud2", Duration::ZERO)));
    let actions = run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(
        actions,
        vec![],
        "ud2 is untouched; ud1 waits for the answer still out"
    );
    assert_eq!(run.up().domain_index, 0);
    let actions = run.answer_next();
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    let actions = run.answer_next();
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Drain, 1, Direction::Backward)]
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
    let rolled: Vec<_> = run
        .run_steps()
        .into_iter()
        .filter(|(_, s)| *s == Step::Rollback)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(rolled, vec!["fe-1a".to_string(), "fe-1b".to_string()]);
}

#[test]
fn rollback_before_anything_ran_rolls_back_nothing() {
    let mut run = Run::new(three_by_two());
    let actions = run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(
        actions,
        vec![Action::Finished {
            status: Status::RolledBack
        }]
    );
    assert!(run.up().is_terminal());
}

#[test]
fn failure_while_paused_with_rollback_policy_waits_for_resume() {
    let mut plan = plan(&[("ud1", &["a1"]), ("ud2", &["b1"])]);
    plan.on_failure = FailureAction::Rollback;
    let mut run = Run::new(plan);
    run.answer_next();
    run.feed(Event::Pause { by: op("alice") });
    run.next();
    let actions = run.feed(done("a1", Step::Drain, 1, false));
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert_eq!(run.up().direction, Direction::Backward);
    assert_eq!(
        run.feed(Event::Rollback { by: op("bob") }),
        vec![],
        "already decided"
    );
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    assert!(matches!(run.up().status, Status::RollingBack { .. }));
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
}

#[test]
fn exhausted_while_rolling_back_pauses() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Abort;
    let mut run = Run::new(plan);
    run.answer_next();
    run.answer_next();
    run.feed(Event::Rollback { by: op("alice") });
    run.answer_next(); // the forward install finishes; readiness is asked
    run.next();
    run.feed(readiness(PoolState::InsufficientActiveFrontEnds, false));
    assert!(
        matches!(run.up().status, Status::Paused { .. }),
        "not aborted: the policy is for the forward pass"
    );
    assert_eq!(run.up().direction, Direction::Backward);
    run.feed(Event::Resume { by: op("alice") });
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
}

#[test]
fn op_id_format() {
    assert_eq!(
        Upgrade::op_id("plan-7", "fe-1", Direction::Forward, Step::Install, 1),
        "plan-7/fe-1/fwd/install/1"
    );
    assert_eq!(
        Upgrade::op_id("plan-7", "fe-1", Direction::Backward, Step::Rollback, 3),
        "plan-7/fe-1/bwd/rollback/3"
    );
    let names: Vec<_> = [
        Step::Drain,
        Step::Stop,
        Step::Install,
        Step::Rollback,
        Step::Restart,
        Step::Verify,
    ]
    .iter()
    .map(Step::name)
    .collect();
    assert_eq!(
        names,
        ["drain", "stop", "install", "rollback", "restart", "verify"]
    );
}

#[test]
fn every_transition_is_recorded() {
    let mut plan = three_by_two();
    plan.server_retries = 1;
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    run.next();
    run.feed(readiness(PoolState::Busy, false));
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Install,
            attempt: 1,
            ..
        } if server == "fe-2b" => Some(done(server, Step::Install, 1, false)),
        _ => None,
    });
    let kinds: std::collections::BTreeSet<String> = run
        .log
        .iter()
        .filter_map(|a| match a {
            Action::Record { kind, .. } => Some(kind.clone()),
            _ => None,
        })
        .collect();
    for kind in [
        "upgrade_started",
        "readiness_busy",
        "readiness_ready",
        "domain_started",
        "step_started",
        "step_succeeded",
        "step_retried",
        "server_done",
        "domain_completed",
        "soak_started",
        "soak_done",
        "completed",
        "finished",
    ] {
        assert!(kinds.contains(kind), "missing {kind}");
    }
}
