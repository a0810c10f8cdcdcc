//! Pool readiness, this system's Get-CsPoolUpgradeReadinessState: a pure function of the pool's
//! shape and its servers' last health, with no clock of its own (times are passed in).
//!
//! - a server is *active* when its agent reports it serving and accepting new connections and
//!   the report is fresh (not lost);
//! - **InsufficientActiveFrontEnds**: no upgrade domain can be taken down without the active
//!   servers outside it dropping below `min_active`;
//! - **Busy**: a server reports busy, a server started serving within the stabilisation window,
//!   or an operation is running on the pool;
//! - **Ready** otherwise. A domain is ReadyForUpgrade when the pool is not busy and the active
//!   servers outside it number at least `min_active`.
//!
//! Servers a running upgrade has taken down (or is taking down) count as inactive whatever
//! their last report says: a report can predate the drain that was just sent.

use crate::config::PoolSpec;
use crate::engine::PoolState;
use crate::link::AgentLimits;
use std::collections::{BTreeSet, HashMap};

/// The service state an agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Serving,
    Draining,
    Drained,
    Stopped,
    Installing,
    Starting,
    Failed,
    /// Not reported (or a value this version does not know).
    Unknown,
}

/// A server as readiness shows it: the agent's state, or lost / unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Serving,
    Draining,
    Drained,
    Stopped,
    Installing,
    Starting,
    Failed,
    /// No fresh report from its agent.
    Lost,
    /// Never heard from.
    Unknown,
}

impl ServerState {
    pub fn name(self) -> &'static str {
        match self {
            ServerState::Serving => "serving",
            ServerState::Draining => "draining",
            ServerState::Drained => "drained",
            ServerState::Stopped => "stopped",
            ServerState::Installing => "installing",
            ServerState::Starting => "starting",
            ServerState::Failed => "failed",
            ServerState::Lost => "lost",
            ServerState::Unknown => "unknown",
        }
    }
}

impl From<AgentState> for ServerState {
    fn from(s: AgentState) -> Self {
        match s {
            AgentState::Serving => ServerState::Serving,
            AgentState::Draining => ServerState::Draining,
            AgentState::Drained => ServerState::Drained,
            AgentState::Stopped => ServerState::Stopped,
            AgentState::Installing => ServerState::Installing,
            AgentState::Starting => ServerState::Starting,
            AgentState::Failed => ServerState::Failed,
            AgentState::Unknown => ServerState::Unknown,
        }
    }
}

/// What the coordinator last heard from one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerHealth {
    /// The service state the agent reported.
    pub state: AgentState,
    /// A TCP connect to the service succeeded.
    pub accepting: bool,
    /// The busy probe said busy.
    pub busy: bool,
    /// The HTTP health probe passed.
    pub healthy: bool,
    /// Installed version.
    pub version: String,
    /// Established connections.
    pub active_connections: u32,
    /// Agent's detail line.
    pub detail: String,
    /// When the last report arrived (coordinator monotonic ms).
    pub seen_ms: u64,
    /// When the server was first seen serving in its current run (monotonic ms).
    pub serving_since_ms: Option<u64>,
    /// The health stream is broken (agent unreachable).
    pub disconnected: bool,
    /// The agent's own time limits, once it has reported them.
    pub limits: Option<AgentLimits>,
    /// The sha256 of the installed artifact in the agent's cache (empty: the version was
    /// installed outside rollgate, so rolling back to it needs an artifact from the plan).
    pub installed_sha256: String,
}

impl ServerHealth {
    /// A server the coordinator has not heard from.
    pub fn unknown(seen_ms: u64, detail: &str) -> ServerHealth {
        ServerHealth {
            state: AgentState::Unknown,
            accepting: false,
            busy: false,
            healthy: false,
            version: String::new(),
            active_connections: 0,
            detail: detail.to_string(),
            seen_ms,
            serving_since_ms: None,
            disconnected: true,
            limits: None,
            installed_sha256: String::new(),
        }
    }
}

/// The readiness of one server, as shown to operators.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerRow {
    /// Server id.
    pub server: String,
    /// Its state, or lost / unknown.
    pub state: ServerState,
    /// Installed version.
    pub version: String,
    /// Counts toward min_active.
    pub active: bool,
    /// Busy (probe or stabilising).
    pub busy: bool,
    /// Health probe.
    pub healthy: bool,
    /// Why, when not plainly serving.
    pub detail: String,
    /// Established connections.
    pub active_connections: u32,
}

/// One domain's readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainRow {
    /// Domain name.
    pub name: String,
    /// Safe to take down now.
    pub ready_for_upgrade: bool,
    /// Why not, or why yes.
    pub reason: String,
    /// Its servers.
    pub servers: Vec<ServerRow>,
}

/// A pool's readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolReadiness {
    /// The pool.
    pub pool: String,
    /// Ready, Busy or InsufficientActiveFrontEnds.
    pub state: PoolState,
    /// Why.
    pub reason: String,
    /// The resolved minimum.
    pub min_active: usize,
    /// Active servers now.
    pub active: usize,
    /// Servers in the pool.
    pub total: usize,
    /// Per domain.
    pub domains: Vec<DomainRow>,
    /// Only the servers whose busy reason is the stabilisation window (the driver waits these
    /// out instead of counting them as Busy answers).
    pub busy_only_stabilising: bool,
}

impl PoolReadiness {
    /// The row of a domain.
    pub fn domain(&self, name: &str) -> Option<&DomainRow> {
        self.domains.iter().find(|d| d.name == name)
    }
}

/// The inputs besides health.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// Now, coordinator monotonic ms.
    pub now_ms: u64,
    /// Reports older than this make a server lost.
    pub lost_after_ms: u64,
    /// Servers serving for less than this make the pool Busy.
    pub stabilization_ms: u64,
}

/// Where [`evaluate`] reads a server's last health: a plain map (tables, the simulation) or
/// the live model's entries in place (no copy of the fleet).
pub trait HealthLookup {
    fn lookup(&self, server: &str) -> Option<&ServerHealth>;
}

impl HealthLookup for HashMap<String, ServerHealth> {
    fn lookup(&self, server: &str) -> Option<&ServerHealth> {
        self.get(server)
    }
}

/// What the per-server pass (or the live model's counters) found, before the pool is judged.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Active servers per domain, in the spec's domain order.
    pub active_in: Vec<usize>,
    /// Why the pool is busy (servers reporting busy or stabilising).
    pub busy_reasons: Vec<String>,
    /// Every busy reason is the stabilisation window.
    pub stabilising_only: bool,
}

/// Whether a server stabilising since `since` still is at `clocks.now_ms`.
pub fn stabilising(clocks: Clocks, since: Option<u64>) -> bool {
    clocks.stabilization_ms > 0
        && since.is_some_and(|s| clocks.now_ms.saturating_sub(s) < clocks.stabilization_ms)
}

/// The busy reason of a server in its stabilisation window.
pub fn stabilising_reason(server: &str, clocks: Clocks) -> String {
    format!(
        "{server} started serving less than {}ms ago",
        clocks.stabilization_ms
    )
}

/// Evaluates a pool. `going_down` are servers a running upgrade has taken (or is taking) out
/// of service: never active. `operation_running` is true while an upgrade step runs on the
/// pool (the operator's view: the pool is Busy); the upgrade's own gate passes false.
pub fn evaluate(
    pool: &PoolSpec,
    health: &impl HealthLookup,
    clocks: Clocks,
    going_down: &BTreeSet<String>,
    operation_running: bool,
) -> PoolReadiness {
    let mut busy_reasons: Vec<String> = Vec::new();
    let mut stabilising_only = true;
    let mut domains = Vec::new();
    let mut active_in: Vec<usize> = Vec::new();
    for (name, servers) in &pool.domains {
        let mut rows = Vec::new();
        let mut active_here = 0;
        for id in servers {
            let row = match health.lookup(id) {
                None => ServerRow {
                    server: id.clone(),
                    state: ServerState::Unknown,
                    version: String::new(),
                    active: false,
                    busy: false,
                    healthy: false,
                    detail: "no report from its agent yet".into(),
                    active_connections: 0,
                },
                Some(h) => {
                    let lost = h.disconnected
                        || clocks.now_ms.saturating_sub(h.seen_ms) > clocks.lost_after_ms;
                    let down = going_down.contains(id);
                    let active = !lost && !down && h.state == AgentState::Serving && h.accepting;
                    let stabilising = active && stabilising(clocks, h.serving_since_ms);
                    let busy = !lost && (h.busy || stabilising);
                    if !lost && h.busy {
                        busy_reasons.push(format!("{id} reports busy"));
                        stabilising_only = false;
                    } else if stabilising {
                        busy_reasons.push(stabilising_reason(id, clocks));
                    }
                    let detail = if down && !lost {
                        "taken out of service by the running upgrade".to_string()
                    } else if lost {
                        if h.disconnected {
                            // Why the stream broke (e.g. a refused certificate) is what an
                            // operator needs to see.
                            let why = if h.detail.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", h.detail)
                            };
                            format!(
                                "agent unreachable; last report {}ms ago{why}",
                                clocks.now_ms.saturating_sub(h.seen_ms)
                            )
                        } else {
                            format!(
                                "no report for {}ms",
                                clocks.now_ms.saturating_sub(h.seen_ms)
                            )
                        }
                    } else {
                        h.detail.clone()
                    };
                    ServerRow {
                        server: id.clone(),
                        state: if lost {
                            ServerState::Lost
                        } else {
                            h.state.into()
                        },
                        version: h.version.clone(),
                        active,
                        busy,
                        healthy: h.healthy && !lost,
                        detail,
                        active_connections: h.active_connections,
                    }
                }
            };
            if row.active {
                active_here += 1;
            }
            rows.push(row);
        }
        active_in.push(active_here);
        domains.push(DomainRow {
            name: name.clone(),
            ready_for_upgrade: false,
            reason: String::new(),
            servers: rows,
        });
    }
    let tally = Tally {
        active_in,
        busy_reasons,
        stabilising_only,
    };
    conclude(pool, domains, tally, operation_running)
}

/// Judges a pool from its tally: the part of readiness shared by the per-server pass and the
/// live model's counters, so that both answer alike. `domains` are the spec's domains in order
/// (with or without their server rows).
pub fn conclude(
    pool: &PoolSpec,
    mut domains: Vec<DomainRow>,
    tally: Tally,
    operation_running: bool,
) -> PoolReadiness {
    let Tally {
        active_in,
        mut busy_reasons,
        mut stabilising_only,
    } = tally;
    if operation_running {
        busy_reasons.push("an upgrade step is running on the pool".into());
        stabilising_only = false;
    }
    let active: usize = active_in.iter().sum();
    let total = pool.domains.iter().map(|(_, s)| s.len()).sum();
    let busy = !busy_reasons.is_empty();
    let mut any_domain_ok = false;
    for (d, here) in domains.iter_mut().zip(&active_in) {
        let outside = active - here;
        let enough = outside >= pool.min_active;
        any_domain_ok |= enough;
        d.ready_for_upgrade = enough && !busy;
        d.reason = if !enough {
            format!(
                "only {outside} active server(s) outside {}, min_active is {}",
                d.name, pool.min_active
            )
        } else if busy {
            "pool is busy".into()
        } else {
            format!(
                "{outside} active server(s) stay outside {} (min_active {})",
                d.name, pool.min_active
            )
        };
    }
    let (state, reason) = if !any_domain_ok {
        (
            PoolState::InsufficientActiveFrontEnds,
            format!("{active} of {total} servers active; no upgrade domain can go down and keep min_active {}", pool.min_active),
        )
    } else if busy {
        (PoolState::Busy, busy_reasons.join("; "))
    } else {
        (
            PoolState::Ready,
            format!(
                "{active} of {total} servers active, min_active {}",
                pool.min_active
            ),
        )
    };
    PoolReadiness {
        pool: pool.name.clone(),
        state,
        reason,
        min_active: pool.min_active,
        active,
        total,
        domains,
        busy_only_stabilising: busy && stabilising_only,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn spec(domains: &[(&str, &[&str])], min_active: usize) -> PoolSpec {
        spec_named("p", domains, min_active)
    }

    /// A pool `name` of `domains` (name, servers), for tests here and in `health`.
    pub(crate) fn spec_named(
        name: &str,
        domains: &[(&str, &[&str])],
        min_active: usize,
    ) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            domains: domains
                .iter()
                .map(|(d, s)| ((*d).into(), s.iter().map(|x| (*x).to_owned()).collect()))
                .collect(),
            min_active,
            paired_pool: None,
        }
    }

    /// A report of a serving, accepting, healthy server seen at `seen_ms`.
    pub(crate) fn serving(seen_ms: u64) -> ServerHealth {
        ServerHealth {
            state: AgentState::Serving,
            accepting: true,
            busy: false,
            healthy: true,
            version: "1".into(),
            active_connections: 0,
            detail: String::new(),
            seen_ms,
            serving_since_ms: Some(0),
            disconnected: false,
            limits: None,
            installed_sha256: String::new(),
        }
    }

    const CLOCKS: Clocks = Clocks {
        now_ms: 10_000,
        lost_after_ms: 3_000,
        stabilization_ms: 0,
    };

    fn six() -> PoolSpec {
        spec(
            &[
                ("ud-1", &["a", "b"]),
                ("ud-2", &["c", "d"]),
                ("ud-3", &["e", "f"]),
            ],
            4,
        )
    }

    fn all_serving(p: &PoolSpec) -> HashMap<String, ServerHealth> {
        p.servers().map(|s| (s.clone(), serving(9_500))).collect()
    }

    #[test]
    fn table() {
        let p = six();
        struct Case {
            name: &'static str,
            change: fn(&mut HashMap<String, ServerHealth>),
            op: bool,
            want: PoolState,
            ready: [bool; 3],
        }
        let cases = [
            Case {
                name: "all serving",
                change: |_| {},
                op: false,
                want: PoolState::Ready,
                ready: [true, true, true],
            },
            Case {
                name: "operation running",
                change: |_| {},
                op: true,
                want: PoolState::Busy,
                ready: [false, false, false],
            },
            Case {
                name: "one busy",
                change: |h| h.get_mut("c").into_iter().for_each(|s| s.busy = true),
                op: false,
                want: PoolState::Busy,
                ready: [false, false, false],
            },
            Case {
                name: "one lost by silence: only its own domain may go",
                change: |h| h.get_mut("a").into_iter().for_each(|s| s.seen_ms = 1_000),
                op: false,
                want: PoolState::Ready,
                ready: [true, false, false],
            },
            Case {
                name: "two down in different domains: insufficient",
                change: |h| {
                    h.get_mut("a")
                        .into_iter()
                        .for_each(|s| s.state = AgentState::Stopped);
                    h.get_mut("c")
                        .into_iter()
                        .for_each(|s| s.disconnected = true);
                },
                op: false,
                want: PoolState::InsufficientActiveFrontEnds,
                ready: [false, false, false],
            },
            Case {
                name: "not accepting is not active",
                change: |h| h.get_mut("e").into_iter().for_each(|s| s.accepting = false),
                op: false,
                want: PoolState::Ready,
                ready: [false, false, true],
            },
        ];
        for c in cases {
            let mut h = all_serving(&p);
            (c.change)(&mut h);
            let r = evaluate(&p, &h, CLOCKS, &BTreeSet::new(), c.op);
            assert_eq!(r.state, c.want, "{}: {}", c.name, r.reason);
            let got: Vec<bool> = r.domains.iter().map(|d| d.ready_for_upgrade).collect();
            assert_eq!(got, c.ready, "{}", c.name);
        }
    }

    #[test]
    fn stabilisation_window_makes_busy_and_is_flagged() {
        let p = six();
        let mut h = all_serving(&p);
        h.get_mut("b")
            .into_iter()
            .for_each(|s| s.serving_since_ms = Some(9_000));
        let r = evaluate(
            &p,
            &h,
            Clocks {
                stabilization_ms: 5_000,
                ..CLOCKS
            },
            &BTreeSet::new(),
            false,
        );
        assert_eq!(r.state, PoolState::Busy);
        assert!(r.busy_only_stabilising);
        assert!(r.reason.contains("b started serving"), "{}", r.reason);
        let r = evaluate(
            &p,
            &h,
            Clocks {
                stabilization_ms: 500,
                ..CLOCKS
            },
            &BTreeSet::new(),
            false,
        );
        assert_eq!(r.state, PoolState::Ready);
    }

    #[test]
    fn unknown_servers_are_not_active() {
        let p = six();
        let r = evaluate(&p, &HashMap::new(), CLOCKS, &BTreeSet::new(), false);
        assert_eq!(r.state, PoolState::InsufficientActiveFrontEnds);
        assert_eq!(r.active, 0);
        assert_eq!(r.domains[0].servers[0].state, ServerState::Unknown);
    }

    #[test]
    fn servers_going_down_are_inactive_even_if_their_report_says_serving() {
        let p = six();
        let h = all_serving(&p);
        // `a` was just sent a drain: its last report still says serving.
        let down: BTreeSet<String> = ["a".to_string()].into();
        let r = evaluate(&p, &h, CLOCKS, &down, false);
        assert_eq!(r.active, 5);
        assert_eq!(r.state, PoolState::Ready);
        // ud-1 may go on (4 active outside), ud-2 may not: 5 - 2 = 3 < 4.
        let got: Vec<bool> = r.domains.iter().map(|d| d.ready_for_upgrade).collect();
        assert_eq!(got, [true, false, false]);
        assert!(!r.domains[0].servers[0].active);
    }
}
