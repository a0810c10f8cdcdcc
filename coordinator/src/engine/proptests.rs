//! Property tests: random plans driven by a simulated driver that answers actions in random
//! order with random outcomes, injects operator commands, and changes leaders (serialize,
//! deserialize, `resume()`, pending work discarded). The invariants are checked after every
//! transition.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const MAX_EVENTS: usize = 20_000;

fn plan_strategy() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(1usize..=4, 1..=5),
        1u32..=3,
        0u32..=2,
        1u32..=3,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                sizes,
                parallelism,
                server_retries,
                busy_retries,
                exhausted,
                rollback,
                canary,
                immediate,
            )| {
                let mut plan = super::tests::plan(&[]);
                plan.domains = sizes
                    .iter()
                    .enumerate()
                    .map(|(d, n)| Domain {
                        name: format!("ud{d}"),
                        // Reverse order so the engine's name ordering is exercised.
                        servers: (0..*n).rev().map(|i| format!("s{d}-{i}")).collect(),
                    })
                    .collect();
                plan.parallelism = parallelism;
                plan.server_retries = server_retries;
                plan.busy_retries = busy_retries;
                plan.on_exhausted = match exhausted {
                    0 => ExhaustedAction::Failover,
                    1 => ExhaustedAction::Pause,
                    _ => ExhaustedAction::Abort,
                };
                plan.paired_pool = Some("pool-b".into());
                plan.on_failure = if rollback {
                    FailureAction::Rollback
                } else {
                    FailureAction::Pause
                };
                plan.canary_soak = canary.then_some(Duration::from_secs(3600));
                // Half the plans wait for a maintenance window before each domain.
                if busy_retries % 2 == 0 {
                    plan.windows = vec![super::window::Window {
                        days: 0b0100000,
                        start: 60,
                        end: 300,
                    }];
                }
                if immediate {
                    plan.drain = DrainMode::Immediate;
                }
                plan
            },
        )
}

/// A stream of random numbers from the test case; once spent, the driver turns benign (all ok,
/// always ready, resume when stuck) so every run must terminate.
struct Dice {
    rolls: Vec<u32>,
    next: usize,
}

impl Dice {
    fn roll(&mut self, n: u32) -> Option<u32> {
        let r = *self.rolls.get(self.next)?;
        self.next += 1;
        Some(r % n.max(1))
    }
}

/// What the world remembers across leader changes.
#[derive(Default)]
struct World {
    /// Servers that got at least one forward step: only these may ever be rolled back.
    touched: BTreeSet<String>,
    /// Distinct install operation ids per server (an agent runs each id once).
    installs: BTreeMap<String, BTreeSet<String>>,
    /// Every operation id `step()` issued: a reused id would get the agent's journaled answer
    /// for an earlier attempt instead of running.
    op_ids: BTreeSet<String>,
    finished: usize,
    events: usize,
}

struct Sim {
    up: Option<Upgrade>,
    pending: Vec<Action>,
    world: World,
}

impl Sim {
    fn new(plan: Plan) -> Result<Sim, TestCaseError> {
        let (up, actions) = Upgrade::new(plan).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut sim = Sim {
            up: Some(up),
            pending: Vec::new(),
            world: World::default(),
        };
        let up = sim.up()?.clone();
        sim.absorb(&up, &actions)?;
        Ok(sim)
    }

    fn up(&self) -> Result<&Upgrade, TestCaseError> {
        self.up
            .as_ref()
            .ok_or_else(|| TestCaseError::fail("upgrade missing"))
    }

    fn absorb(&mut self, post: &Upgrade, actions: &[Action]) -> Result<(), TestCaseError> {
        for a in actions {
            match a {
                Action::Record { .. } => {}
                Action::Finished { .. } => self.world.finished += 1,
                Action::RunStep {
                    server,
                    step,
                    op_id,
                    ..
                } => {
                    if post.servers.get(server).map(|p| p.direction) == Some(Direction::Forward)
                        && step.takes_down()
                    {
                        self.world.touched.insert(server.clone());
                    }
                    if *step == Step::Install {
                        self.world
                            .installs
                            .entry(server.clone())
                            .or_default()
                            .insert(op_id.clone());
                    }
                    self.pending.push(a.clone());
                }
                _ => self.pending.push(a.clone()),
            }
        }
        Ok(())
    }

    fn feed(&mut self, event: Event) -> Result<Vec<Action>, TestCaseError> {
        let pre = self
            .up
            .take()
            .ok_or_else(|| TestCaseError::fail("upgrade missing"))?;
        let snapshot = pre.clone();
        let (post, actions) = pre.step(event.clone());
        self.world.events += 1;
        check_transition(&snapshot, &event, &post, &actions, &self.world)?;
        for a in &actions {
            if let Action::RunStep {
                op_id,
                server,
                step,
                attempt,
                ..
            } = a
            {
                // Only a step whose answer never came is sent again, under its own id.
                let reissue = matches!(
                    snapshot.servers.get(server).map(|p| &p.phase),
                    Some(ServerPhase::Unanswered { step: s, attempt: n, .. }) if s == step && n == attempt
                );
                prop_assert!(
                    self.world.op_ids.insert(op_id.clone()) || reissue,
                    "operation id {} reused",
                    op_id
                );
            }
        }
        self.absorb(&post, &actions)?;
        prop_assert!(self.world.finished <= 1, "Finished emitted twice");
        self.up = Some(post);
        Ok(actions)
    }

    /// A new leader: the state goes through storage, the old driver's work is lost, and only
    /// what `resume()` asks for is done.
    fn change_leader(&mut self) -> Result<(), TestCaseError> {
        let up = self.up()?.clone();
        let json = serde_json::to_string(&up).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let loaded: Upgrade =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&loaded, &up);
        let actions = loaded.resume();
        prop_assert_eq!(&actions, &up.resume(), "resume is deterministic");
        for a in &actions {
            match a {
                Action::RunStep {
                    server,
                    step,
                    op_id,
                    attempt,
                    ..
                } => {
                    let p = &loaded.servers[server];
                    prop_assert_eq!(
                        &p.phase,
                        &ServerPhase::InFlight {
                            step: *step,
                            attempt: *attempt
                        }
                    );
                    prop_assert_eq!(
                        op_id,
                        &Upgrade::op_id(&loaded.plan.id, server, p.direction, *step, *attempt)
                    );
                }
                Action::Record { .. } | Action::Finished { .. } => {
                    return Err(TestCaseError::fail("resume emits only work"));
                }
                _ => {}
            }
        }
        let resumed_steps = actions
            .iter()
            .filter(|a| matches!(a, Action::RunStep { .. }))
            .count();
        prop_assert_eq!(resumed_steps, loaded.in_flight());
        self.pending.clear();
        self.absorb(&loaded, &actions)?;
        self.up = Some(loaded);
        Ok(())
    }
}

fn step_of(up: &Upgrade, server: &str) -> Option<(Step, u32)> {
    match up.servers.get(server)?.phase {
        ServerPhase::InFlight { step, attempt } => Some((step, attempt)),
        _ => None,
    }
}

fn check_state(up: &Upgrade) -> Result<(), TestCaseError> {
    let plan = &up.plan;
    let mut down = 0;
    let mut preparing = 0;
    for (name, p) in &up.servers {
        let (in_flight, takes_down) = match &p.phase {
            ServerPhase::InFlight { step, .. } => (true, step.takes_down()),
            ServerPhase::Unanswered { step, .. } => (false, step.takes_down()),
            ServerPhase::Prepared => (false, false),
            _ => continue,
        };
        if p.direction == Direction::Restore {
            prop_assert!(up.status.is_terminal(), "{} restored before the end", name);
            continue;
        }
        if takes_down {
            down += 1;
        } else if p.direction == up.direction {
            preparing += 1;
        }
        if in_flight || p.phase == ServerPhase::Prepared {
            let domain = plan.domain_of(name);
            // A forward prepare may run one domain ahead (prepare-ahead); one still out when a
            // rollback started is ahead of the rollback until it answers.
            let ahead = !takes_down
                && p.direction == Direction::Forward
                && match up.direction {
                    Direction::Forward => domain == Some(up.domain_index + 1),
                    _ => domain.is_some_and(|d| d > up.domain_index) && in_flight,
                };
            prop_assert!(
                domain == Some(up.domain_index) || ahead,
                "{} worked on outside the current domain ({:?}, at {})",
                name,
                p,
                up.domain_index
            );
        }
    }
    prop_assert!(
        down <= plan.parallelism as usize,
        "{} servers down > parallelism {}",
        down,
        plan.parallelism
    );
    prop_assert!(
        preparing <= plan.parallelism as usize,
        "{} servers preparing > parallelism {} at domain {} ({:?}, {:?}): {:?}",
        preparing,
        plan.parallelism,
        up.domain_index,
        up.direction,
        up.status,
        up.servers
    );
    for (d, domain) in plan.domains.iter().enumerate() {
        for s in &domain.servers {
            let p = &up.servers[s];
            match up.direction {
                Direction::Forward if d < up.domain_index => {
                    prop_assert_eq!(
                        &p.phase,
                        &ServerPhase::Done,
                        "{} behind the current domain",
                        s
                    );
                }
                Direction::Forward if d > up.domain_index => {
                    // Pending, or (the next domain only) prepared ahead.
                    let prepare_ahead = d == up.domain_index + 1
                        && matches!(
                            &p.phase,
                            ServerPhase::Prepared
                                | ServerPhase::InFlight {
                                    step: Step::Prepare,
                                    ..
                                }
                                | ServerPhase::Unanswered {
                                    step: Step::Prepare,
                                    ..
                                }
                                | ServerPhase::Failed {
                                    step: Step::Prepare,
                                    ..
                                }
                        );
                    prop_assert!(
                        p.phase == ServerPhase::Pending || prepare_ahead,
                        "{} ahead of the current domain: {:?}",
                        s,
                        p
                    );
                    prop_assert_eq!(p.direction, Direction::Forward);
                }
                Direction::Backward if d > up.domain_index => {
                    // A forward prepare still out when the rollback started answers later.
                    let untouched = p.direction == Direction::Forward
                        && matches!(
                            &p.phase,
                            ServerPhase::Pending
                                | ServerPhase::InFlight {
                                    step: Step::Prepare,
                                    ..
                                }
                                | ServerPhase::Unanswered {
                                    step: Step::Prepare,
                                    ..
                                }
                        );
                    let rolled_back =
                        p.direction == Direction::Backward && p.phase == ServerPhase::Done;
                    prop_assert!(
                        untouched || rolled_back,
                        "{} left in {:?} behind the rollback",
                        s,
                        p
                    );
                }
                _ => {}
            }
        }
    }
    match &up.status {
        Status::Completed => {
            prop_assert!(up
                .servers
                .values()
                .all(|p| p.phase == ServerPhase::Done && p.direction == Direction::Forward));
        }
        Status::RolledBack => {
            prop_assert!(
                up.servers.values().all(|p| {
                    (p.direction == Direction::Backward && p.phase == ServerPhase::Done)
                        || (p.direction == Direction::Forward
                            && matches!(
                                p.phase,
                                ServerPhase::Pending
                                    | ServerPhase::InFlight {
                                        step: Step::Prepare,
                                        ..
                                    }
                            ))
                }),
                "rolled back with a server in between: {:?}",
                up.servers
            );
        }
        _ => {}
    }
    if up.is_terminal() {
        // Nothing this upgrade took down is left without a restore, unless its agent never
        // answered (then it is listed).
        for (name, p) in &up.servers {
            if p.down {
                let unanswered = matches!(p.phase, ServerPhase::Unanswered { .. });
                let restore_failed = p.direction == Direction::Restore
                    && matches!(p.phase, ServerPhase::Failed { .. });
                prop_assert!(
                    unanswered || restore_failed,
                    "{} left out of service without a restore: {:?}",
                    name,
                    p
                );
                prop_assert!(p.out_of_service().is_some());
            }
        }
    }
    Ok(())
}

fn check_transition(
    pre: &Upgrade,
    event: &Event,
    post: &Upgrade,
    actions: &[Action],
    world: &World,
) -> Result<(), TestCaseError> {
    check_state(post)?;
    if pre.is_terminal() {
        prop_assert_eq!(pre, post, "terminal state changed");
        prop_assert!(
            actions.iter().all(|a| matches!(a, Action::Record { .. })),
            "terminal emitted {:?}",
            actions
        );
        return Ok(());
    }
    prop_assert!(
        pre.status.is_terminal() <= post.status.is_terminal(),
        "left a terminal status"
    );
    if pre.status.is_terminal() {
        // After the end, only chains already in flight go on, and restores start.
        for a in actions {
            if let Action::RunStep {
                direction, server, ..
            } = a
            {
                prop_assert!(
                    *direction == Direction::Restore || step_of(pre, server).is_some(),
                    "{} launched after the end",
                    server
                );
            }
        }
    }
    let finished: Vec<&Status> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Finished { status } => Some(status),
            _ => None,
        })
        .collect();
    prop_assert_eq!(
        finished.len(),
        usize::from(post.is_terminal()),
        "Finished exactly when terminal"
    );
    if let Some(status) = finished.first() {
        prop_assert_eq!(*status, &post.status);
        prop_assert_eq!(post.in_flight(), 0);
    }
    if pre.direction == post.direction {
        match post.direction {
            Direction::Backward => prop_assert!(post.domain_index <= pre.domain_index),
            _ => prop_assert!(post.domain_index >= pre.domain_index),
        }
    } else {
        prop_assert_eq!(
            pre.direction,
            Direction::Forward,
            "a rollback never turns forward again"
        );
        prop_assert!(post.domain_index <= pre.domain_index);
    }
    let checks = actions
        .iter()
        .filter(|a| matches!(a, Action::CheckReadiness { .. }))
        .count();
    prop_assert!(checks <= 1, "{} readiness checks at once", checks);
    let mut launched = BTreeSet::new();
    for a in actions {
        match a {
            Action::RunStep {
                server,
                step,
                direction,
                op_id,
                attempt,
            } => {
                prop_assert!(
                    launched.insert(server.clone()),
                    "two steps for {} at once",
                    server
                );
                prop_assert_eq!(
                    step_of(post, server),
                    Some((*step, *attempt)),
                    "{} not in flight on its step",
                    server
                );
                prop_assert_eq!(*direction, post.servers[server].direction);
                prop_assert_eq!(
                    op_id,
                    &Upgrade::op_id(&post.plan.id, server, *direction, *step, *attempt)
                );
                let pre_phase = pre.servers.get(server).map(|p| p.phase.clone());
                match direction {
                    Direction::Restore => {
                        prop_assert!(post.status.is_terminal(), "restore before the end");
                        prop_assert!(matches!(step, Step::Restart | Step::Verify));
                        continue;
                    }
                    Direction::Forward => prop_assert!(*step != Step::Rollback),
                    Direction::Backward => {
                        prop_assert!(*step != Step::Install);
                        prop_assert!(
                            world.touched.contains(server),
                            "rolling back untouched {}",
                            server
                        );
                    }
                }
                let ahead = *step == Step::Prepare
                    && *direction == Direction::Forward
                    && post.direction == Direction::Forward
                    && post.plan.domain_of(server) == Some(post.domain_index + 1);
                prop_assert!(
                    post.plan.domain_of(server) == Some(post.domain_index) || ahead,
                    "{} outside the current domain: {:?} {:?} at domain {} ({:?}, {:?}) after {:?}, was {:?}",
                    server,
                    step,
                    direction,
                    post.domain_index,
                    post.direction,
                    post.status,
                    event,
                    pre_phase
                );
                // The procedure's per-server ReadyForUpgrade: a prepared server goes down only
                // on a Ready answer (or with the traffic on the paired pool).
                if pre_phase == Some(ServerPhase::Prepared) {
                    let ready = matches!(
                        event,
                        Event::Readiness {
                            state: PoolState::Ready,
                            domain_ready: true,
                            ..
                        }
                    );
                    prop_assert!(
                        ready || post.failed_over,
                        "{} went down without a Ready answer (event {:?})",
                        server,
                        event
                    );
                }
                let continuation = step_of(pre, server).is_some();
                let reissue = matches!(pre_phase, Some(ServerPhase::Unanswered { .. }));
                prop_assert!(
                    continuation || reissue || post.status.is_active(),
                    "{} launched while {:?} (event {:?})",
                    server,
                    post.status,
                    event
                );
            }
            Action::CheckReadiness { domain, .. } => {
                prop_assert!(post.status.is_active());
                let answered = matches!(event, Event::Readiness { .. });
                prop_assert!(
                    pre.readiness_outstanding.is_none() || answered,
                    "asked readiness again while a check is out (event {:?})",
                    event
                );
                prop_assert_eq!(post.readiness_outstanding, Some(post.domain_index));
                prop_assert!(
                    post.servers
                        .values()
                        .any(|p| p.phase == ServerPhase::Prepared),
                    "readiness asked with nobody waiting to go down"
                );
                prop_assert_eq!(Some(domain.as_str()), post.current_domain());
                prop_assert!(!post.failed_over);
            }
            Action::Failover { .. } => {
                prop_assert_eq!(&post.plan.on_exhausted, &ExhaustedAction::Failover);
                prop_assert_eq!(&post.domain_phase, &DomainPhase::FailingOver);
            }
            Action::Soak { .. } => {
                prop_assert_eq!(post.domain_index, 0);
                prop_assert_eq!(&post.domain_phase, &DomainPhase::Soaking);
            }
            Action::AwaitWindow { domain } => {
                // Only a forward domain waits, only with windows, and nothing of it is down.
                prop_assert!(!post.plan.windows.is_empty());
                prop_assert_eq!(post.direction, Direction::Forward);
                prop_assert_eq!(&post.domain_phase, &DomainPhase::AwaitingWindow);
                prop_assert_eq!(Some(domain.as_str()), post.current_domain());
            }
            Action::Record { .. } | Action::Finished { .. } => {}
        }
    }
    Ok(())
}

/// Answers `action` with a random (or, once the dice are spent, benign) outcome.
fn answer(action: &Action, dice: &mut Dice, hostile: bool) -> Option<Event> {
    let mut roll = |n| if hostile { dice.roll(n) } else { None };
    Some(match action {
        Action::CheckReadiness { id, .. } => {
            let id = *id;
            let (state, domain_ready) = match roll(10) {
                Some(0..=1) => (PoolState::Busy, false),
                Some(2) => (PoolState::Ready, false),
                Some(3) => (PoolState::InsufficientActiveFrontEnds, false),
                _ => (PoolState::Ready, true),
            };
            Event::Readiness {
                id,
                state,
                domain_ready,
                reason: "sim".into(),
            }
        }
        Action::RunStep {
            server,
            step,
            attempt,
            ..
        } => Event::StepDone {
            server: server.clone(),
            step: *step,
            attempt: *attempt,
            outcome: match roll(16) {
                Some(0 | 1) => Outcome::Failed {
                    message: "sim".into(),
                },
                Some(2) => Outcome::Unknown {
                    message: "sim".into(),
                },
                _ => Outcome::Succeeded {
                    message: "sim".into(),
                },
            },
        },
        Action::Failover { .. } => Event::FailoverDone {
            ok: !matches!(roll(5), Some(0)),
            message: "sim".into(),
        },
        Action::Soak { .. } => Event::SoakDone,
        Action::AwaitWindow { .. } => Event::WindowOpen,
        Action::Record { .. } | Action::Finished { .. } => return None,
    })
}

/// Rolls out of 40: aborts are rare so most runs get far.
fn operator(roll: u32) -> Event {
    let by = "sim-operator".to_string();
    match roll {
        0..=13 => Event::Pause { by },
        14..=33 => Event::Resume { by },
        34..=37 => Event::Rollback { by },
        _ => Event::Abort { by },
    }
}

/// An event nobody asked for: a wrong or unknown server, step or attempt, or an answer to a
/// request that may not be outstanding. If it happens to match what the engine waits for it is
/// taken as the answer, and the real answer later arrives as a stale one.
fn junk(up: &Upgrade, dice: &mut Dice) -> Event {
    let mut roll = |n| dice.roll(n).unwrap_or(0);
    let steps = [
        Step::Prepare,
        Step::Drain,
        Step::Stop,
        Step::Install,
        Step::Rollback,
        Step::Restart,
        Step::Verify,
    ];
    match roll(4) {
        0 => {
            let mut names: Vec<String> = up.servers.keys().cloned().collect();
            names.push("ghost".into());
            Event::StepDone {
                server: names[roll(names.len() as u32) as usize].clone(),
                step: steps[roll(7) as usize],
                attempt: roll(4),
                outcome: if roll(2) == 0 {
                    Outcome::Succeeded {
                        message: "junk".into(),
                    }
                } else {
                    Outcome::Failed {
                        message: "junk".into(),
                    }
                },
            }
        }
        // The question asked now, or one asked before it (a late answer).
        1 => Event::Readiness {
            id: up.readiness_asked.saturating_sub(u64::from(roll(2))),
            state: [
                PoolState::Ready,
                PoolState::Busy,
                PoolState::InsufficientActiveFrontEnds,
            ][roll(3) as usize],
            domain_ready: roll(2) == 0,
            reason: "junk".into(),
        },
        2 => Event::FailoverDone {
            ok: roll(2) == 0,
            message: "junk".into(),
        },
        _ => Event::SoakDone,
    }
}

/// Drives a run to its end. `hostile` enables failures, busy pools and operator commands;
/// leader changes and answer order are random either way.
fn drive(plan: Plan, rolls: Vec<u32>, hostile: bool) -> Result<Sim, TestCaseError> {
    let mut sim = Sim::new(plan)?;
    let mut dice = Dice { rolls, next: 0 };
    while !sim.up()?.is_terminal() {
        prop_assert!(
            sim.world.events < MAX_EVENTS,
            "no end after {} events: {:?}",
            MAX_EVENTS,
            sim.up()?
        );
        match dice.roll(1000) {
            Some(0..=19) => {
                sim.change_leader()?;
                continue;
            }
            Some(r @ 20..=59) if hostile => {
                sim.feed(operator(r - 20))?;
                continue;
            }
            Some(60..=89) if hostile => {
                // An answer with the number of the question asked now is taken as its
                // answer (garbled); the real one, arriving later, is then stale and dropped.
                let event = junk(sim.up()?, &mut dice);
                sim.feed(event)?;
                continue;
            }
            _ => {}
        }
        if sim.pending.is_empty() {
            // Only an operator can unstick a paused upgrade.
            prop_assert!(
                matches!(sim.up()?.status, Status::Paused { .. }),
                "nothing to do while {:?}",
                sim.up()?
            );
            sim.feed(Event::Resume {
                by: "sim-operator".into(),
            })?;
            continue;
        }
        let index = dice.roll(sim.pending.len() as u32).unwrap_or(0) as usize;
        let action = sim.pending.remove(index);
        let Some(event) = answer(&action, &mut dice, hostile) else {
            continue;
        };
        let before = sim.up()?.clone();
        let actions = sim.feed(event.clone())?;
        if let Action::CheckReadiness { domain: asked, .. } = &action {
            // Readiness answers carry no domain: only the engine's bookkeeping keeps an answer
            // about one domain from starting another.
            if !sim.up()?.failed_over {
                for a in &actions {
                    if let Action::Record { kind, domain, .. } = a {
                        prop_assert!(
                            kind != "domain_started" || domain.as_ref() == Some(asked),
                            "answer about {} started {:?}",
                            asked,
                            domain
                        );
                    }
                }
            }
        }
        if let (
            Event::StepDone {
                server,
                step,
                attempt,
                ..
            },
            Some(0),
        ) = (&event, dice.roll(10))
        {
            // A duplicate delivery must change nothing, unless the server happens to be on the
            // same step and attempt again (a new chain), which the event cannot tell apart.
            if step_of(sim.up()?, server) != Some((*step, *attempt)) && !before.is_terminal() {
                let expected = sim.up()?.clone();
                let actions = sim.feed(event)?;
                prop_assert_eq!(sim.up()?, &expected, "duplicate changed the state");
                prop_assert!(
                    actions.iter().all(|a| matches!(a, Action::Record { .. })),
                    "duplicate emitted {:?}",
                    actions
                );
            }
        }
    }
    prop_assert!(
        sim.world.finished == 1,
        "Finished emitted {} times",
        sim.world.finished
    );
    Ok(sim)
}

proptest! {
    // Failing seeds are kept next to this file (proptests.regressions), inside the engine.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_runs_keep_the_invariants_and_terminate(
        plan in plan_strategy(),
        rolls in prop::collection::vec(any::<u32>(), 0..600),
    ) {
        let sim = drive(plan, rolls, true)?;
        let up = sim.up()?;
        prop_assert!(up.is_terminal());
        prop_assert!(up.resume().is_empty());
    }

    #[test]
    fn all_ok_runs_install_every_server_once_and_complete(
        plan in plan_strategy(),
        rolls in prop::collection::vec(any::<u32>(), 0..600),
    ) {
        let sim = drive(plan, rolls, false)?;
        let up = sim.up()?;
        prop_assert_eq!(&up.status, &Status::Completed);
        prop_assert!(up.servers.values().all(|p| p.phase == ServerPhase::Done));
        prop_assert!(!up.failed_over);
        for server in up.servers.keys() {
            let installs = sim.world.installs.get(server).map_or(0, BTreeSet::len);
            prop_assert_eq!(installs, 1, "{} installed {} times", server, installs);
        }
    }
}
