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
        min_active: Some(1),
        rollback_artifact: None,
        windows: vec![],
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

fn ready(id: u64) -> Event {
    Event::Readiness {
        id,
        state: PoolState::Ready,
        domain_ready: true,
        reason: "ok".into(),
    }
}

fn readiness(id: u64, state: PoolState, domain_ready: bool) -> Event {
    Event::Readiness {
        id,
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
        outcome: if ok {
            Outcome::Succeeded {
                message: "ok".into(),
            }
        } else {
            Outcome::Failed {
                message: "boom".into(),
            }
        },
    }
}

fn unknown(server: &str, step: Step, attempt: u32) -> Event {
    Event::StepDone {
        server: server.into(),
        step,
        attempt,
        outcome: Outcome::Unknown {
            message: "agent unreachable".into(),
        },
    }
}

fn op(who: &str) -> String {
    who.to_string()
}

/// The usual answer to an action: everything succeeds, the pool is always ready.
fn ok_answer(action: &Action) -> Option<Event> {
    match action {
        Action::CheckReadiness { id, .. } => Some(ready(*id)),
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
        Action::AwaitWindow { .. } => Some(Event::WindowOpen),
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

    /// Answers the readiness check asked now.
    fn feed_readiness(&mut self, state: PoolState, domain_ready: bool) -> Vec<Action> {
        let id = self.up().readiness_asked;
        self.feed(readiness(id, state, domain_ready))
    }

    /// Removes and returns the oldest queued work action.
    fn next(&mut self) -> Action {
        self.queue.pop_front().expect("a queued action")
    }

    /// Removes the queued action matching `f`.
    fn take(&mut self, f: impl Fn(&Action) -> bool) -> Action {
        let i = self.queue.iter().position(f).expect("a matching action");
        self.queue.remove(i).expect("present")
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

    /// Answers everything until `server` has `step` queued, which is left in the queue.
    fn until_queued(&mut self, server: &str, step: Step) {
        for _ in 0..1_000 {
            if self.queue.iter().any(|a| is_step(a, server, step)) {
                return;
            }
            self.answer_next();
        }
        panic!("{server} {step} never queued");
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
                Action::CheckReadiness { domain, after, .. } => Some((domain.clone(), *after)),
                _ => None,
            })
            .collect()
    }

    fn phase(&self, server: &str) -> ServerPhase {
        self.up().servers[server].phase.clone()
    }
}

fn is_step(a: &Action, server: &str, step: Step) -> bool {
    matches!(a, Action::RunStep { server: s, step: st, .. } if s == server && *st == step)
}

/// The actions that do something, with readiness check numbers left out of comparisons.
fn work(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Record { .. }))
        .map(norm)
        .collect()
}

fn norm(a: &Action) -> Action {
    match a {
        Action::CheckReadiness { domain, after, .. } => Action::CheckReadiness {
            id: 0,
            domain: domain.clone(),
            after: *after,
        },
        other => other.clone(),
    }
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

const FWD: [Step; 5] = [
    Step::Prepare,
    Step::Drain,
    Step::Install,
    Step::Restart,
    Step::Verify,
];
const BWD: [Step; 5] = [
    Step::Prepare,
    Step::Drain,
    Step::Rollback,
    Step::Restart,
    Step::Verify,
];

fn run_step(server: &str, step: Step, attempt: u32, direction: Direction) -> Action {
    Action::RunStep {
        server: server.into(),
        step,
        direction,
        op_id: Upgrade::op_id("p1", server, direction, step, attempt),
        attempt,
    }
}

fn check(domain: &str, after: Duration) -> Action {
    Action::CheckReadiness {
        id: 0,
        domain: domain.into(),
        after,
    }
}

#[test]
fn new_prepares_the_first_server_at_once() {
    let (up, actions) = Upgrade::new(three_by_two()).expect("valid");
    assert_eq!(up.status, Status::Running);
    assert_eq!(up.domain_phase, DomainPhase::InProgress);
    assert_eq!(
        work(&actions),
        vec![run_step("fe-1a", Step::Prepare, 1, Direction::Forward)],
        "prepare needs no readiness: the server keeps serving"
    );
}

#[test]
fn happy_path_parallelism_1_checks_readiness_before_every_server_goes_down() {
    let mut run = Run::new(three_by_two());
    assert_eq!(
        run.answer_next(),
        vec![check("ud1", Duration::ZERO)],
        "prepared: the gate asks readiness"
    );
    assert_eq!(
        run.answer_next(),
        vec![
            run_step("fe-1a", Step::Drain, 1, Direction::Forward),
            run_step("fe-1b", Step::Prepare, 1, Direction::Forward),
        ],
        "the next server prepares while the first is worked on"
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert!(run.up().is_terminal());
    let mut want = Vec::new();
    for s in ["fe-1a", "fe-1b", "fe-2a", "fe-2b", "fe-3a", "fe-3b"] {
        want.extend(chain(s, &FWD));
    }
    let mut got = run.run_steps();
    got.sort_by_key(|(s, _)| s.clone());
    let mut want_sorted = want.clone();
    want_sorted.sort_by_key(|(s, _)| s.clone());
    assert_eq!(got, want_sorted);
    // The down steps of one server never overlap another's: parallelism 1.
    let down: Vec<String> = run
        .run_steps()
        .into_iter()
        .filter(|(_, s)| *s == Step::Drain)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(down, ["fe-1a", "fe-1b", "fe-2a", "fe-2b", "fe-3a", "fe-3b"]);
    assert_eq!(run.checks().len(), 6, "one readiness answer per server");
    assert_eq!(run.finished(), vec![Status::Completed]);
}

#[test]
fn happy_path_parallelism_2() {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    assert_eq!(
        work(&run.log),
        vec![
            run_step("fe-1a", Step::Prepare, 1, Direction::Forward),
            run_step("fe-1b", Step::Prepare, 1, Direction::Forward),
        ]
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert_eq!(run.checks().len(), 6);
}

#[test]
fn a_busy_answer_before_the_second_server_of_a_domain_holds_it() {
    let mut run = Run::new(plan(&[("ud1", &["a", "b"]), ("ud2", &["c"])]));
    run.answer_next(); // a prepared -> check
    run.answer_next(); // ready: a drains, b prepares
    run.take(|a| is_step(a, "b", Step::Prepare));
    run.feed(done("b", Step::Prepare, 1, true));
    for step in [Step::Drain, Step::Install, Step::Restart, Step::Verify] {
        let a = run.take(|a| is_step(a, "a", step));
        run.feed(ok_answer(&a).expect("step"));
    }
    assert_eq!(
        run.queue.front().map(norm),
        Some(check("ud1", Duration::ZERO))
    );
    run.next();
    let actions = run.feed_readiness(PoolState::Busy, true);
    assert_eq!(actions, vec![check("ud1", DEFAULT_BUSY_RETRY_INTERVAL)]);
    assert_eq!(run.phase("b"), ServerPhase::Prepared, "b does not go down");
    run.next();
    let actions = run.feed_readiness(PoolState::Ready, true);
    // b goes down; with no server of ud1 left to prepare, c (ud2) is prepared ahead.
    assert_eq!(
        actions,
        vec![
            run_step("b", Step::Drain, 1, Direction::Forward),
            run_step("c", Step::Prepare, 1, Direction::Forward)
        ]
    );
}

#[test]
fn first_step_has_deterministic_op_id() {
    let (_, actions) = Upgrade::new(three_by_two()).expect("valid");
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::RunStep { op_id, .. } if op_id == "p1/fe-1a/fwd/prepare/1"
    )));
}

fn exhaust_with_busy(run: &mut Run) -> Vec<Action> {
    run.answer_next(); // prepared -> check
    run.next();
    run.feed_readiness(PoolState::Busy, true);
    run.next();
    run.feed_readiness(PoolState::Busy, true);
    run.next();
    run.feed_readiness(PoolState::Busy, true)
}

#[test]
fn ready_pool_with_unready_domain_counts_as_busy() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    run.next();
    let actions = run.feed_readiness(PoolState::Ready, false);
    assert_eq!(actions, vec![check("ud1", DEFAULT_BUSY_RETRY_INTERVAL)]);
    assert_eq!(run.up().busy_answers, 1);
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
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    assert!(run.up().failed_over);
    assert_eq!(run.checks().len(), 3, "no readiness after failing over");
}

#[test]
fn failed_failover_pauses_and_resume_asks_at_once_then_fails_over_after_one_answer() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Failover;
    plan.paired_pool = Some("pool-b".into());
    let mut run = Run::new(plan);
    exhaust_with_busy(&mut run);
    run.next();
    run.feed(Event::FailoverDone {
        ok: false,
        message: "lb api down".into(),
    });
    assert!(
        matches!(&run.up().status, Status::Paused { reason } if reason.contains("lb api down"))
    );
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    run.next();
    let actions = run.feed_readiness(PoolState::Busy, true);
    assert!(matches!(actions[..], [Action::Failover { .. }]));
}

#[test]
fn busy_three_times_pauses_and_resume_asks_again() {
    let mut run = Run::new(three_by_two());
    assert_eq!(exhaust_with_busy(&mut run), vec![]);
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert!(
        run.run_steps().iter().all(|(_, s)| *s == Step::Prepare),
        "nothing went down"
    );
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
    assert_eq!(
        actions,
        vec![Action::Finished {
            status: Status::Aborted {
                reason: "pool busy 3 times: test".into()
            }
        }]
    );
    assert_eq!(
        run.phase("fe-1a"),
        ServerPhase::Pending,
        "prepared, never down"
    );
}

#[test]
fn insufficient_front_ends_exhausts_at_once() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    run.next();
    run.feed_readiness(PoolState::InsufficientActiveFrontEnds, false);
    assert!(
        matches!(&run.up().status, Status::Paused { reason } if reason.contains("insufficient"))
    );
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
            attempt: 1,
            ..
        } if server == "fe-2a" && !failed_once => {
            failed_once = true;
            Some(done(server, Step::Verify, 1, false))
        }
        _ => None,
    });
    assert_eq!(run.up().status, Status::Completed);
    assert!(run
        .log
        .contains(&run_step("fe-2a", Step::Verify, 2, Direction::Forward)));
}

#[test]
fn failure_exhausted_pauses_and_resume_retries_with_new_attempt() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Verify);
    run.take(|a| is_step(a, "fe-1a", Step::Verify));
    let actions = run.feed(done("fe-1a", Step::Verify, 1, false));
    assert_eq!(actions, vec![]);
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert_eq!(
        run.up().out_of_service(),
        vec![(
            "fe-1a".to_string(),
            "forward chain failed at verify: boom".to_string()
        )]
    );
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert!(actions.contains(&run_step("fe-1a", Step::Verify, 2, Direction::Forward)));
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn a_failed_prepare_takes_nothing_down() {
    let mut run = Run::new(three_by_two());
    run.next();
    run.feed(done("fe-1a", Step::Prepare, 1, false));
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert!(run.up().out_of_service().is_empty());
    assert!(run.up().down_servers().is_empty());
    let actions = run.feed(Event::Abort { by: op("alice") });
    assert_eq!(
        actions,
        vec![Action::Finished {
            status: Status::Aborted {
                reason: "aborted by alice".into()
            }
        }],
        "nothing to restore"
    );
}

#[test]
fn failure_rolls_back_touched_servers_in_reverse_domain_order() {
    let mut plan = three_by_two();
    plan.on_failure = FailureAction::Rollback;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step: Step::Verify,
            direction: Direction::Forward,
            attempt,
            ..
        } if server == "fe-2a" => Some(done(server, Step::Verify, *attempt, false)),
        _ => None,
    });
    assert_eq!(run.up().status, Status::RolledBack);
    let rolled: Vec<String> = run
        .run_steps()
        .into_iter()
        .filter(|(_, s)| *s == Step::Rollback)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(rolled, ["fe-2a", "fe-1a", "fe-1b"]);
    assert!(
        !run.run_steps().iter().any(|(s, _)| s.starts_with("fe-3")),
        "ud3 was never touched"
    );
    // Each backward chain prepares (checks the rollback can run) before going down.
    let bwd: Vec<Step> = run
        .log
        .iter()
        .filter_map(|a| match a {
            Action::RunStep {
                server,
                step,
                direction: Direction::Backward,
                ..
            } if server == "fe-1a" => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(bwd, BWD);
}

#[test]
fn rollback_event_waits_for_in_flight_forward_steps() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Install);
    let actions = run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(actions, vec![], "install in flight: nothing launched");
    assert!(matches!(run.up().status, Status::RollingBack { .. }));
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
    let rolled: Vec<String> = run
        .run_steps()
        .into_iter()
        .filter(|(_, s)| *s == Step::Rollback)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(rolled, ["fe-1a"], "fe-1b only prepared: never touched");
}

#[test]
fn backward_chain_failure_ends_failed_and_restores_the_server() {
    let mut plan = three_by_two();
    plan.on_failure = FailureAction::Rollback;
    let mut run = Run::new(plan);
    run.run_with(|a| match a {
        Action::RunStep {
            server,
            step,
            direction,
            attempt,
            ..
        } if server == "fe-1a"
            && ((*step == Step::Verify && *direction == Direction::Forward)
                || (*step == Step::Rollback && *direction == Direction::Backward)) =>
        {
            Some(done(server, *step, *attempt, false))
        }
        _ => None,
    });
    assert!(matches!(run.up().status, Status::Failed { .. }));
    assert!(run.up().is_terminal());
    // The failed rollback left fe-1a stopped: it is restarted and verified on what it runs.
    let restore: Vec<Step> = run
        .log
        .iter()
        .filter_map(|a| match a {
            Action::RunStep {
                step,
                direction: Direction::Restore,
                ..
            } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(restore, [Step::Restart, Step::Verify]);
    assert_eq!(run.phase("fe-1a"), ServerPhase::Done);
    assert_eq!(run.up().servers["fe-1a"].direction, Direction::Restore);
    assert!(run.up().out_of_service().is_empty());
    assert_eq!(run.finished().len(), 1);
}

#[test]
fn abort_restores_a_server_left_draining_and_reports_one_that_cannot_be_restored() {
    let mut run = Run::new(plan(&[("ud1", &["a", "b"]), ("ud2", &["c"])]));
    run.until_queued("a", Step::Drain);
    run.take(|x| is_step(x, "a", Step::Drain));
    run.feed(done("a", Step::Drain, 1, false));
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert_eq!(run.up().out_of_service().len(), 1);
    // b is being prepared meanwhile; abort while that is in flight.
    let actions = run.feed(Event::Abort { by: op("alice") });
    assert_eq!(
        actions,
        vec![run_step("a", Step::Restart, 1, Direction::Restore)]
    );
    assert!(run.finished().is_empty(), "restore in flight");
    run.run_with(|x| match x {
        Action::RunStep {
            server,
            step: Step::Verify,
            direction: Direction::Restore,
            attempt,
            ..
        } if server == "a" => Some(done(server, Step::Verify, *attempt, false)),
        _ => None,
    });
    assert!(run.up().is_terminal());
    assert_eq!(
        run.up().out_of_service(),
        vec![(
            "a".to_string(),
            "could not be restored (verify): boom".to_string()
        )]
    );
    assert_eq!(run.finished().len(), 1);
    assert_eq!(run.phase("b"), ServerPhase::Pending, "b only prepared");
}

#[test]
fn an_unanswered_step_pauses_and_resume_asks_again_with_the_same_op_id() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Install);
    run.take(|a| is_step(a, "fe-1a", Step::Install));
    let actions = run.feed(unknown("fe-1a", Step::Install, 1));
    assert_eq!(actions, vec![]);
    assert!(
        matches!(&run.up().status, Status::Paused { reason } if reason.contains("no answer to install"))
    );
    assert_eq!(run.up().in_flight(), 1, "fe-1b's prepare is still out");
    assert_eq!(run.up().down_servers(), vec!["fe-1a".to_string()]);
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(
        actions,
        vec![run_step("fe-1a", Step::Install, 1, Direction::Forward)],
        "same attempt, same operation id: never a second install"
    );
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    let installs = run
        .run_steps()
        .iter()
        .filter(|(s, st)| s == "fe-1a" && *st == Step::Install)
        .count();
    assert_eq!(installs, 2, "issued twice, one operation id");
}

#[test]
fn pause_lets_in_flight_chain_finish_and_resume_continues() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Install);
    run.feed(Event::Pause { by: op("alice") });
    run.run_ok();
    assert!(matches!(run.up().status, Status::Paused { .. }));
    assert_eq!(run.phase("fe-1a"), ServerPhase::Done);
    assert_eq!(
        run.phase("fe-1b"),
        ServerPhase::Prepared,
        "never taken down"
    );
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn pause_while_waiting_ready_drops_the_answer_and_resume_asks_once() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    run.feed(Event::Pause { by: op("alice") });
    let actions = run.answer_next();
    assert_eq!(actions, vec![], "answer dropped");
    assert_eq!(run.up().readiness_outstanding, None);
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
}

#[test]
fn abort_with_in_flight_finishes_after_last_chain() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Restart);
    let actions = run.feed(Event::Abort { by: op("alice") });
    assert_eq!(actions, vec![]);
    assert!(run.finished().is_empty());
    run.run_ok();
    assert_eq!(run.finished().len(), 1);
    assert_eq!(run.phase("fe-1a"), ServerPhase::Done);
    assert!(run.up().is_terminal());
}

#[test]
fn stale_and_duplicate_step_results_are_ignored() {
    let mut run = Run::new(three_by_two());
    run.answer_next(); // prepared
    let before = run.up().clone();
    let actions = run.feed(done("fe-1a", Step::Prepare, 1, true));
    assert_eq!(actions, vec![]);
    assert_eq!(run.up(), &before);
    let actions = run.feed(done("nobody", Step::Drain, 1, true));
    assert_eq!(actions, vec![]);
    let actions = run.feed(done("fe-1a", Step::Install, 7, true));
    assert_eq!(actions, vec![]);
    assert_eq!(run.up(), &before);
}

#[test]
fn canary_domain_soaks_before_the_next() {
    let mut plan = three_by_two();
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    while !matches!(run.queue.front(), Some(Action::Soak { .. })) {
        run.answer_next();
    }
    assert_eq!(run.up().domain_phase, DomainPhase::Soaking);
    assert_eq!(run.up().domain_index, 0);
    // The next domain's first server was prepared ahead while the canary ran: after the
    // soak its gate is asked at once.
    assert_eq!(run.phase("fe-2a"), ServerPhase::Prepared);
    let actions = run.answer_next();
    assert_eq!(actions, vec![check("ud2", Duration::ZERO)]);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
}

#[test]
fn canary_soak_skipped_when_nothing_follows() {
    let mut p = plan(&[("ud1", &["a"])]);
    p.canary_soak = Some(MIN);
    let mut run = Run::new(p);
    run.run_ok();
    assert!(!run.log.iter().any(|a| matches!(a, Action::Soak { .. })));
}

#[test]
fn immediate_drain_uses_stop() {
    let mut p = three_by_two();
    p.drain = DrainMode::Immediate;
    let mut run = Run::new(p);
    run.run_ok();
    assert!(run.run_steps().iter().any(|(_, s)| *s == Step::Stop));
    assert!(!run.run_steps().iter().any(|(_, s)| *s == Step::Drain));
}

#[test]
fn an_internal_error_pauses_instead_of_waiting_forever() {
    let mut run = Run::new(three_by_two());
    run.answer_next();
    run.next(); // the readiness task dies: its answer never comes
    run.feed(Event::Internal {
        message: "the readiness task panicked".into(),
    });
    assert!(matches!(&run.up().status, Status::Paused { reason } if reason.contains("panicked")));
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)]);
}

#[test]
fn plan_validation_errors() {
    type Mutation = fn(&mut Plan);
    let cases: Vec<(Mutation, &str)> = vec![
        (|p| p.id.clear(), "id must not be empty"),
        (|p| p.pool = " ".into(), "pool must not be empty"),
        (|p| p.version.clear(), "version must not be empty"),
        (|p| p.sha256.clear(), "sha256"),
        (|p| p.domains.clear(), "domains must not be empty"),
        (|p| p.domains[1].servers.clear(), "ud2"),
        (|p| p.domains[2].servers.push("fe-1a".into()), "fe-1a"),
        (|p| p.domains[2].name = "ud1".into(), "ud1"),
        (|p| p.parallelism = 0, "parallelism"),
        (|p| p.busy_retries = 0, "busy_retries"),
        (
            |p| p.verify_stable = 3 * MIN,
            "verify_stable (3m) must not exceed verify_timeout (2m)",
        ),
        (
            |p| p.on_exhausted = ExhaustedAction::Failover,
            "paired_pool",
        ),
        (|p| p.domains[0].name.clear(), "domains"),
        (|p| p.domains[0].servers[0].clear(), "ud1"),
        // Upper bounds: no value in a plan may crash or hold a coordinator for years.
        (
            |p| {
                p.drain = DrainMode::Graceful {
                    timeout: Duration::from_secs(100_000_000 * 365 * 86_400),
                }
            },
            "drain_timeout",
        ),
        (
            |p| p.verify_timeout = Duration::from_secs(2 * 86_400),
            "verify_timeout (2days) exceeds its upper bound of 1day",
        ),
        (
            |p| p.busy_retry_interval = Duration::from_secs(25 * 3600),
            "busy_retry_interval",
        ),
        (
            |p| p.canary_soak = Some(Duration::from_secs(8 * 86_400)),
            "canary_soak",
        ),
        (
            |p| p.busy_retries = 101,
            "busy_retries (101) exceeds its upper bound of 100",
        ),
        (|p| p.server_retries = 21, "server_retries"),
        (|p| p.parallelism = 10_001, "parallelism"),
        (
            |p| p.version = "v".repeat(129),
            "version is 129 characters long",
        ),
        (|p| p.sha256 = "xy".repeat(32), "sha256"),
        (
            |p| {
                p.rollback_artifact = Some(RollbackArtifact {
                    artifact: "a".into(),
                    sha256: "nope".into(),
                })
            },
            "sha256",
        ),
    ];
    for (mutate, needle) in cases {
        let mut plan = three_by_two();
        mutate(&mut plan);
        let err = plan.validate().expect_err("invalid plan");
        let message = err.to_string();
        assert!(message.contains(needle), "{message:?} names {needle}");
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert_eq!(Upgrade::new(plan).err(), Some(err));
    }
    let mut ok = three_by_two();
    ok.on_exhausted = ExhaustedAction::Failover;
    ok.paired_pool = Some("pool-b".into());
    ok.verify_stable = ok.verify_timeout;
    ok.drain = DrainMode::Graceful {
        timeout: bounds::MAX_STEP_WAIT,
    };
    assert_eq!(ok.validate(), Ok(()));
}

#[test]
fn a_stored_plan_beyond_its_bounds_pauses_with_the_reason_and_lets_in_flight_steps_finish() {
    let mut run = Run::new(three_by_two());
    run.until_queued("fe-1a", Step::Install);
    // The stored plan is changed behind the engine's back (an older version stored it).
    let mut up = run.up.take().expect("present");
    up.plan.drain = DrainMode::Graceful {
        timeout: Duration::from_secs(100_000_000 * 365 * 86_400),
    };
    let err = up.plan.validate().expect_err("out of bounds");
    let (up, actions) = up.block(&err);
    assert!(matches!(&up.status, Status::Paused { reason } if reason.contains("drain_timeout")));
    assert!(work(&actions).is_empty());
    let resumed = up.resume();
    assert!(resumed.contains(&run_step("fe-1a", Step::Install, 1, Direction::Forward)));
    run.up = Some(up);
    run.feed(Event::Resume { by: op("alice") });
    assert!(
        matches!(run.up().status, Status::Paused { .. }),
        "resume is refused while the plan cannot be executed"
    );
    run.feed(Event::Abort { by: op("alice") });
    run.run_ok();
    assert!(run.up().is_terminal());
}

#[test]
fn plan_deserializes_with_defaults() {
    let json = format!(
        r#"{{
        "id": "p9", "pool": "pool-a", "version": "2.0", "artifact": "a.tgz", "sha256": "{}",
        "drain": {{"graceful": {{"timeout": "5m"}}}},
        "verify_stable": "10s", "verify_timeout": "2m",
        "domains": [{{"name": "ud1", "servers": ["s1"]}}]
    }}"#,
        "0".repeat(64)
    );
    let plan: Plan = serde_json::from_str(&json).expect("parses");
    assert_eq!(plan.parallelism, 1);
    assert_eq!(plan.busy_retry_interval, Duration::from_secs(600));
    assert_eq!(plan.busy_retries, 3);
    assert_eq!(plan.server_retries, 0);
    assert_eq!(plan.on_exhausted, ExhaustedAction::Pause);
    assert_eq!(plan.on_failure, FailureAction::Pause);
    assert_eq!(plan.canary_soak, None);
    assert_eq!(plan.min_active, None);
    assert_eq!(plan.drain, DrainMode::Graceful { timeout: 5 * MIN });
    assert_eq!(plan.validate(), Ok(()));
}

#[test]
fn serde_round_trip_mid_run_and_resume_reissues_same_op_ids() -> Result<(), serde_json::Error> {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.answer_next(); // fe-1a prepared -> check
    run.answer_next(); // fe-1b prepared
    run.answer_next(); // ready: fe-1a drains
    run.answer_next(); // ready again: fe-1b drains
    let json = serde_json::to_string(run.up())?;
    let loaded: Upgrade = serde_json::from_str(&json)?;
    assert_eq!(&loaded, run.up());
    let mut outstanding: Vec<String> = run.queue.iter().map(|a| format!("{a:?}")).collect();
    let mut resumed: Vec<String> = loaded.resume().iter().map(|a| format!("{a:?}")).collect();
    outstanding.sort();
    resumed.sort();
    assert_eq!(
        resumed, outstanding,
        "a new leader re-issues exactly what is outstanding"
    );
    run.up = Some(loaded);
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);

    // A busy gate is asked again after the interval.
    let mut run = Run::new(three_by_two());
    run.answer_next();
    run.next();
    run.feed_readiness(PoolState::Busy, true);
    assert_eq!(
        work(&run.up().resume()),
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
        ready(1),
        done("fe-1a", Step::Drain, 1, true),
        Event::FailoverDone {
            ok: true,
            message: "x".into(),
        },
        Event::SoakDone,
        Event::Internal {
            message: "x".into(),
        },
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
fn rollback_before_anything_went_down_rolls_back_nothing() {
    let mut run = Run::new(three_by_two());
    run.next(); // fe-1a's prepare is in flight
    let actions = run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(actions, vec![]);
    let actions = run.feed(done("fe-1a", Step::Prepare, 1, true));
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
    run.until_queued("a1", Step::Drain);
    run.feed(Event::Pause { by: op("alice") });
    run.take(|x| is_step(x, "a1", Step::Drain));
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
    assert_eq!(
        actions,
        vec![run_step("a1", Step::Prepare, 1, Direction::Backward)]
    );
    assert!(matches!(run.up().status, Status::RollingBack { .. }));
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
}

#[test]
fn exhausted_while_rolling_back_pauses() {
    let mut plan = three_by_two();
    plan.on_exhausted = ExhaustedAction::Abort;
    let mut run = Run::new(plan);
    run.until_queued("fe-1a", Step::Install);
    run.feed(Event::Rollback { by: op("alice") });
    run.until_queued("fe-1a", Step::Prepare);
    run.answer_next(); // fe-1a backward prepare -> the gate asks
    while !matches!(run.queue.front(), Some(Action::CheckReadiness { .. })) {
        run.answer_next();
    }
    run.next();
    run.feed_readiness(PoolState::InsufficientActiveFrontEnds, false);
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
    assert_eq!(
        Upgrade::op_id("plan-7", "fe-1", Direction::Restore, Step::Restart, 1),
        "plan-7/fe-1/rst/restart/1"
    );
}

#[test]
fn actions_that_need_a_stored_state() {
    let step = run_step("a", Step::Drain, 1, Direction::Forward);
    assert!(step.needs_stored_state());
    assert!(!check("ud1", Duration::ZERO).needs_stored_state());
    assert!(check("ud1", MIN).needs_stored_state());
    assert!(Action::Soak { after: MIN }.needs_stored_state());
    assert!(Action::Failover {
        pool: "a".into(),
        paired: "b".into()
    }
    .needs_stored_state());
}

#[test]
fn every_transition_is_recorded() {
    let mut plan = three_by_two();
    plan.server_retries = 1;
    plan.canary_soak = Some(MIN);
    let mut run = Run::new(plan);
    run.answer_next();
    run.next();
    run.feed_readiness(PoolState::Busy, false);
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

/// Found by the simulation (seeds 50308, 125613, 345767 of the first million): a readiness
/// check asked before a rollback answered after it, was taken for the answer to the rollback's
/// own question, and let a server go down on a stale view of the pool.
#[test]
fn an_answer_to_an_older_readiness_question_is_ignored() {
    let mut plan = three_by_two();
    plan.parallelism = 2;
    let mut run = Run::new(plan);
    run.answer_next(); // fe-1a prepared: question 1 asked
    let old = run.take(|a| matches!(a, Action::CheckReadiness { .. }));
    let Action::CheckReadiness { id: old_id, .. } = old else {
        panic!("a readiness check");
    };
    run.answer_next(); // fe-1b prepared; question 1 is still out
    assert_eq!(run.up().readiness_asked, old_id);
    // A pause (like a rollback or a leader change) leaves question 1's check running.
    run.feed(Event::Pause { by: op("alice") });
    run.feed_readiness(PoolState::Busy, true); // question 1 answered while paused: dropped
    let actions = run.feed(Event::Resume { by: op("alice") });
    assert_eq!(actions, vec![check("ud1", Duration::ZERO)], "question 2");
    assert!(run.up().readiness_asked > old_id);
    // The answer to question 1 arrives again (a late duplicate): it is not question 2's.
    let actions = run.feed(readiness(old_id, PoolState::Ready, true));
    assert_eq!(actions, vec![]);
    assert_eq!(
        run.phase("fe-1a"),
        ServerPhase::Prepared,
        "nothing went down"
    );
    assert!(run.up().readiness_outstanding.is_some());
    let actions = run.feed_readiness(PoolState::Ready, true);
    assert!(actions.contains(&run_step("fe-1a", Step::Drain, 1, Direction::Forward)));
}

#[test]
fn a_completed_upgrade_is_rolled_back_as_a_new_plan_domain_by_domain() {
    let mut run = Run::new(three_by_two());
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    // Not while anything runs: only a completed upgrade is reverted.
    let mut running = Run::new(three_by_two());
    running.answer_next();
    assert!(Upgrade::revert(running.up(), "p2".into(), "operator/alice")
        .expect("valid")
        .is_none());

    let (up, actions) = Upgrade::revert(run.up(), "p2".into(), "operator/alice")
        .expect("valid")
        .expect("a completed upgrade can be reverted");
    assert_eq!(up.plan.id, "p2");
    assert!(matches!(up.status, Status::RollingBack { .. }));
    assert_eq!(up.direction, Direction::Backward);
    let mut back = Run {
        up: Some(up),
        queue: VecDeque::new(),
        log: Vec::new(),
    };
    back.absorb(actions);
    back.run_ok();
    assert_eq!(back.up().status, Status::RolledBack);
    assert_eq!(back.finished(), vec![Status::RolledBack]);
    // Every server goes back once, last domain first, each chain a full backward chain
    // (prepare, drain, rollback, restart, verify; the next server prepares while one is
    // down), with new operation ids.
    let order = ["fe-3a", "fe-3b", "fe-2a", "fe-2b", "fe-1a", "fe-1b"];
    let steps = back.run_steps();
    for s in order {
        let own: Vec<(String, Step)> = steps.iter().filter(|(x, _)| x == s).cloned().collect();
        assert_eq!(own, chain(s, &BWD), "{s}");
    }
    let down: Vec<&str> = steps
        .iter()
        .filter(|(_, st)| *st == Step::Drain)
        .map(|(x, _)| x.as_str())
        .collect();
    assert_eq!(down, order);
    for a in &back.log {
        if let Action::RunStep { op_id, .. } = a {
            assert!(op_id.starts_with("p2/"), "{op_id}");
        }
    }
    // The readiness gate before every server that goes down, in its own domain.
    let checks: Vec<String> = back.checks().into_iter().map(|(d, _)| d).collect();
    assert_eq!(checks, vec!["ud3", "ud3", "ud2", "ud2", "ud1", "ud1"]);
}

#[test]
fn with_maintenance_windows_each_domain_waits_for_one_and_a_rollback_does_not() {
    let mut p = three_by_two();
    p.windows = vec!["Sat 01:00-05:00 UTC".parse().expect("valid window")];
    let (up, actions) = Upgrade::new(p.clone()).expect("valid plan");
    // Nothing is prepared before the window opens.
    assert_eq!(
        work(&actions),
        vec![Action::AwaitWindow {
            domain: "ud1".into()
        }]
    );
    assert_eq!(up.domain_phase, DomainPhase::AwaitingWindow);
    assert!(actions.iter().any(
        |a| matches!(a, Action::Record { kind, message, .. } if kind == "awaiting_window" && message.contains("Sat 01:00-05:00 UTC"))
    ));
    // A leader that takes over mid-wait waits again.
    assert_eq!(
        up.resume(),
        vec![Action::AwaitWindow {
            domain: "ud1".into()
        }]
    );
    let mut run = Run::new(p);
    let first = run.feed(Event::WindowOpen);
    assert!(
        first.iter().any(|a| is_step(a, "fe-1a", Step::Prepare)),
        "{first:?}"
    );
    // Every domain waited for its window.
    run.run_ok();
    assert_eq!(run.up().status, Status::Completed);
    let waits: Vec<&str> = run
        .log
        .iter()
        .filter_map(|a| match a {
            Action::AwaitWindow { domain } => Some(domain.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(waits, vec!["ud1", "ud2", "ud3"]);

    // A rollback asked while the next domain waits starts at once.
    let mut p = three_by_two();
    p.windows = vec!["Sat 01:00-05:00 UTC".parse().expect("valid window")];
    let mut run = Run::new(p);
    run.feed(Event::WindowOpen);
    while run.up().domain_phase != DomainPhase::AwaitingWindow {
        run.answer_next();
    }
    assert_eq!(run.up().current_domain(), Some("ud2"));
    run.feed(Event::Rollback { by: op("alice") });
    assert_eq!(run.up().domain_phase, DomainPhase::InProgress);
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
}

/// B1: while a domain works, the next one's servers are prepared, so that when it starts its
/// first server goes down after its gate alone. A rollback does not wait for such a prepare,
/// and its answer leaves the server untouched.
#[test]
fn the_next_domain_is_prepared_ahead_and_a_rollback_leaves_it_untouched() {
    let mut run = Run::new(plan(&[("ud1", &["a"]), ("ud2", &["b"])]));
    run.until_queued("a", Step::Drain);
    assert_eq!(
        run.phase("b"),
        ServerPhase::InFlight {
            step: Step::Prepare,
            attempt: 1
        },
        "b is prepared while a works"
    );
    let prepare_b = run.take(|x| is_step(x, "b", Step::Prepare));
    let drain_a = run.take(|x| is_step(x, "a", Step::Drain));
    run.feed(ok_answer(&drain_a).expect("drain"));
    // a's chain is in flight: it joins the rollback when its step ends, and the rollback's
    // own prepare of a goes out though b's forward prepare is still out (parallelism 1).
    run.feed(Event::Rollback { by: op("alice") });
    let install_a = run.take(|x| is_step(x, "a", Step::Install));
    let actions = run.feed(ok_answer(&install_a).expect("install"));
    assert!(
        actions
            .iter()
            .any(|x| matches!(x, Action::RunStep { server, direction: Direction::Backward, .. } if server == "a")),
        "{actions:?}"
    );
    let actions = run.feed(ok_answer(&prepare_b).expect("prepare"));
    assert!(
        !actions.iter().any(|x| matches!(x, Action::RunStep { .. })),
        "{actions:?}"
    );
    assert_eq!(run.phase("b"), ServerPhase::Pending);
    run.run_ok();
    assert_eq!(run.up().status, Status::RolledBack);
    assert_eq!(run.up().servers["b"].direction, Direction::Forward);
}
