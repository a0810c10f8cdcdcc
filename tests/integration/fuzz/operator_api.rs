//! The coordinator's operator API under generated bad input, against one real coordinator
//! (embedded store) leading a real two-server fleet over mTLS, reused by every case.
//!
//! No upgrade ever runs, so every generated call is either invalid for a stated reason (`why`)
//! and must be refused with a clear status, or one that may succeed but changes nothing (the
//! read-only calls, a dry run). After every call: the coordinator process still runs and still
//! leads at the same epoch, the store file is byte for byte as before, and the pool's upgrade
//! status and event history are as before.

use super::wire::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;
use rollgate_common::tls::RoleKind;
use rollgate_coordinator::engine::Plan;
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use rollgate_tests::cluster::{operator_client, CoordinatorProc, Fleet};
use rollgate_tests::eventually;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const POOL: &str = "pool-a";
const DOMAINS: [&str; 2] = ["ud-1", "ud-2"];
const MAX_SOAK_MS: u64 = 7 * 24 * 3600 * 1000;
/// Where a start that should never have been accepted would fetch from: nowhere, so that it
/// fails at the first preparation and takes no server down.
const NOWHERE: &str = "/nonexistent/fuzz-2.0.tar";
const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone)]
enum Expect {
    Refused(Vec<Code>),
    Answered,
    /// A dry run: refused with one of these codes, or answered with a plan agents can execute.
    RefusedOrPlan(Vec<Code>),
    /// A roll-out dry run: refused with one of these codes, or answered as a dry run.
    RefusedOrDryRollout(Vec<Code>),
}

#[derive(Debug, Clone)]
enum Call {
    Readiness(pb::PoolRequest),
    Inventory,
    Start(Box<pb::StartUpgradeRequest>),
    Get(pb::PoolRequest),
    Watch(pb::PoolRequest),
    Pause(pb::PoolRequest),
    Resume(pb::PoolRequest),
    Abort(pb::PoolRequest),
    Rollback(pb::PoolRequest),
    Failover(pb::PoolRequest),
    Failback(pb::PoolRequest),
    Events(pb::EventsRequest),
    History(pb::HistoryRequest),
    Leader,
    StartRollout(Box<pb::StartRolloutRequest>),
    GetRollout(pb::RolloutRequest),
    WatchRollout(pb::RolloutRequest),
    PauseRollout(pb::RolloutRequest),
    ResumeRollout(pb::RolloutRequest),
    AbortRollout(pb::RolloutRequest),
}

impl Call {
    fn path(&self) -> &'static str {
        match self {
            Call::Readiness(_) => "/rollgate.operator.v1.Operator/Readiness",
            Call::Inventory => "/rollgate.operator.v1.Operator/Inventory",
            Call::Start(_) => "/rollgate.operator.v1.Operator/StartUpgrade",
            Call::Get(_) => "/rollgate.operator.v1.Operator/GetUpgrade",
            Call::Watch(_) => "/rollgate.operator.v1.Operator/WatchUpgrade",
            Call::Pause(_) => "/rollgate.operator.v1.Operator/PauseUpgrade",
            Call::Resume(_) => "/rollgate.operator.v1.Operator/ResumeUpgrade",
            Call::Abort(_) => "/rollgate.operator.v1.Operator/AbortUpgrade",
            Call::Rollback(_) => "/rollgate.operator.v1.Operator/RollbackUpgrade",
            Call::Failover(_) => "/rollgate.operator.v1.Operator/Failover",
            Call::Failback(_) => "/rollgate.operator.v1.Operator/Failback",
            Call::Events(_) => "/rollgate.operator.v1.Operator/Events",
            Call::History(_) => "/rollgate.operator.v1.Operator/History",
            Call::Leader => "/rollgate.operator.v1.Operator/Leader",
            Call::StartRollout(_) => "/rollgate.operator.v1.Operator/StartRollout",
            Call::GetRollout(_) => "/rollgate.operator.v1.Operator/GetRollout",
            Call::WatchRollout(_) => "/rollgate.operator.v1.Operator/WatchRollout",
            Call::PauseRollout(_) => "/rollgate.operator.v1.Operator/PauseRollout",
            Call::ResumeRollout(_) => "/rollgate.operator.v1.Operator/ResumeRollout",
            Call::AbortRollout(_) => "/rollgate.operator.v1.Operator/AbortRollout",
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Call::Readiness(r)
            | Call::Get(r)
            | Call::Watch(r)
            | Call::Pause(r)
            | Call::Resume(r)
            | Call::Abort(r)
            | Call::Rollback(r)
            | Call::Failover(r)
            | Call::Failback(r) => r.encode_to_vec(),
            Call::Inventory => pb::InventoryRequest {}.encode_to_vec(),
            Call::Start(r) => r.encode_to_vec(),
            Call::Events(r) => r.encode_to_vec(),
            Call::History(r) => r.encode_to_vec(),
            Call::Leader => pb::LeaderRequest {}.encode_to_vec(),
            Call::StartRollout(r) => r.encode_to_vec(),
            Call::GetRollout(r)
            | Call::WatchRollout(r)
            | Call::PauseRollout(r)
            | Call::ResumeRollout(r)
            | Call::AbortRollout(r) => r.encode_to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    call: Call,
    as_agent: bool,
    expect: Expect,
    why: String,
}

/// What a call answered.
#[derive(Debug)]
enum Answer {
    Upgrade(Option<Box<pb::UpgradeStatus>>),
    Rollout(Box<pb::RolloutStatus>),
}

fn case(call: Call, expect: Expect, why: impl Into<String>) -> Case {
    Case {
        call,
        as_agent: false,
        expect,
        why: why.into(),
    }
}

fn refused(codes: &[Code]) -> Expect {
    Expect::Refused(codes.to_vec())
}

/// A pool name that is not configured, and the codes it may get (empty: a name is required).
fn bad_pool() -> BoxedStrategy<(String, Vec<Code>)> {
    odd_string()
        .prop_filter("not the configured pool", |p| p != POOL)
        .prop_map(|p| {
            let codes = if p.is_empty() {
                vec![Code::InvalidArgument]
            } else {
                vec![Code::NotFound, Code::InvalidArgument]
            };
            (p, codes)
        })
        .boxed()
}

fn pool_calls() -> BoxedStrategy<Case> {
    let pool = |p: &str| pb::PoolRequest { pool: p.into() };
    let bad = (bad_pool(), 0..12u8, any::<u32>()).prop_map(move |((p, codes), which, limit)| {
        let r = pool(&p);
        let call = match which {
            0 => Call::Readiness(r),
            1 => Call::Get(r),
            2 => Call::Watch(r),
            3 => Call::Pause(r),
            4 => Call::Resume(r),
            5 => Call::Abort(r),
            6 => Call::Rollback(r),
            7 => Call::Failover(r),
            8 => Call::Failback(r),
            10 => Call::History(pb::HistoryRequest { pool: p, limit }),
            _ => Call::Events(pb::EventsRequest {
                pool: p,
                limit,
                ..Default::default()
            }),
        };
        case(
            call,
            Expect::Refused(codes),
            "no pool of that name is configured",
        )
    });
    let seq = || {
        prop_oneof![
            Just(None),
            Just(Some(0u64)),
            Just(Some(u64::MAX)),
            any::<Option<u64>>()
        ]
    };
    let good = (
        0..11u8,
        prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()],
        seq(),
        seq(),
    )
        .prop_map(move |(which, limit, after_seq, before_seq)| {
            let r = pool(POOL);
            match which {
                10 => case(
                    Call::History(pb::HistoryRequest {
                        pool: POOL.into(),
                        limit,
                    }),
                    Expect::Answered,
                    "read-only, any limit",
                ),
                0 => case(Call::Readiness(r), Expect::Answered, "read-only"),
                1 => case(Call::Get(r), Expect::Answered, "read-only"),
                2 => case(Call::Watch(r), Expect::Answered, "read-only"),
                3 => case(
                    Call::Events(pb::EventsRequest {
                        pool: POOL.into(),
                        limit,
                        after_seq,
                        before_seq,
                    }),
                    Expect::Answered,
                    "read-only, any limit and page bounds",
                ),
                4 => case(
                    Call::Pause(r),
                    refused(&[Code::NotFound]),
                    "no upgrade runs",
                ),
                5 => case(
                    Call::Resume(r),
                    refused(&[Code::NotFound]),
                    "no upgrade runs",
                ),
                6 => case(
                    Call::Abort(r),
                    refused(&[Code::NotFound]),
                    "no upgrade runs",
                ),
                7 => case(
                    Call::Rollback(r),
                    refused(&[Code::NotFound]),
                    "no upgrade runs",
                ),
                8 => case(
                    Call::Failover(r),
                    refused(&[Code::InvalidArgument]),
                    "the pool has no paired pool",
                ),
                _ => case(
                    Call::Failback(r),
                    refused(&[Code::InvalidArgument]),
                    "the pool has no paired pool",
                ),
            }
        });
    prop_oneof![
        3 => bad,
        2 => good,
        1 => Just(case(Call::Inventory, Expect::Answered, "read-only")),
        1 => Just(case(Call::Leader, Expect::Answered, "read-only")),
    ]
    .boxed()
}

/// A start request that is valid in every field (the defects make it invalid).
fn valid_start() -> BoxedStrategy<pb::StartUpgradeRequest> {
    use proptest::option::of as opt;
    (
        (
            opt(1..=10_000u32),
            opt(0..=MAX_WAIT_MS),
            opt(1..=100u32),
            opt(0..=20u32),
            0..=2i32,
            0..=2i32,
            prop_oneof![Just(0i32), Just(2), Just(3)],
        ),
        (
            opt(0..=5_000u64),
            opt(5_000..=MAX_WAIT_MS),
            opt(0..=MAX_WAIT_MS),
            opt(0..=MAX_SOAK_MS),
            prop_oneof![
                Just(Vec::new()),
                Just(vec!["ud-1".to_string(), "ud-2".into()]),
                Just(vec!["ud-2".to_string(), "ud-1".into()]),
            ],
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (
                    parallelism,
                    drain_timeout_ms,
                    busy_retries,
                    server_retries,
                    drain,
                    on_failure,
                    on_exhausted,
                ),
                (
                    verify_stable_ms,
                    verify_timeout_ms,
                    busy_retry_interval_ms,
                    canary_soak_ms,
                    domain_order,
                    with_rollback,
                ),
            )| pb::StartUpgradeRequest {
                pool: POOL.into(),
                version: "2.0".into(),
                artifact: NOWHERE.into(),
                sha256: SHA.into(),
                drain,
                drain_timeout_ms,
                parallelism,
                verify_stable_ms,
                verify_timeout_ms,
                busy_retry_interval_ms,
                busy_retries,
                on_exhausted,
                server_retries,
                on_failure,
                domain_order,
                canary_soak_ms,
                dry_run: false,
                rollback_artifact: if with_rollback {
                    NOWHERE.into()
                } else {
                    String::new()
                },
                rollback_sha256: if with_rollback {
                    SHA.into()
                } else {
                    String::new()
                },
            },
        )
        .boxed()
}

/// One thing wrong with a start request, for a stated reason.
#[derive(Debug, Clone)]
enum Defect {
    PoolEmpty,
    PoolUnknown(String),
    Version(String),
    ArtifactBlank(String),
    ArtifactTooLong(usize),
    Sha(String),
    Drain(i32),
    OnExhausted(i32),
    FailoverWithoutPair,
    OnFailure(i32),
    RollbackHalf(bool),
    RollbackSha(String),
    DomainUnknown(String, bool),
    DomainMissing,
    DomainTwice,
    Wait(&'static str, u64),
    StableOverTimeout(u64, u64),
    Parallelism(u32),
    BusyRetries(u32),
    ServerRetries(u32),
}

impl Defect {
    /// Breaks `r`; returns the codes the refusal may have.
    fn apply(&self, r: &mut pb::StartUpgradeRequest) -> Vec<Code> {
        let invalid = vec![Code::InvalidArgument];
        match self {
            Defect::PoolEmpty => r.pool = String::new(),
            Defect::PoolUnknown(p) => {
                r.pool = p.clone();
                return vec![Code::NotFound, Code::InvalidArgument];
            }
            Defect::Version(v) => r.version = v.clone(),
            Defect::ArtifactBlank(a) => r.artifact = a.clone(),
            Defect::ArtifactTooLong(n) => r.artifact = format!("/{}", "a".repeat(*n)),
            Defect::Sha(s) => r.sha256 = s.clone(),
            Defect::Drain(d) => r.drain = *d,
            Defect::OnExhausted(e) => r.on_exhausted = *e,
            Defect::FailoverWithoutPair => r.on_exhausted = pb::ExhaustedAction::Failover as i32,
            Defect::OnFailure(f) => r.on_failure = *f,
            Defect::RollbackHalf(sha_only) => {
                if *sha_only {
                    r.rollback_artifact = String::new();
                    r.rollback_sha256 = SHA.into();
                } else {
                    r.rollback_artifact = NOWHERE.into();
                    r.rollback_sha256 = String::new();
                }
            }
            Defect::RollbackSha(s) => {
                r.rollback_artifact = NOWHERE.into();
                r.rollback_sha256 = s.clone();
            }
            Defect::DomainUnknown(d, alone) => {
                r.domain_order = if *alone {
                    vec![d.clone()]
                } else {
                    vec!["ud-1".into(), "ud-2".into(), d.clone()]
                };
            }
            Defect::DomainMissing => r.domain_order = vec!["ud-2".into()],
            Defect::DomainTwice => {
                r.domain_order = vec!["ud-1".into(), "ud-1".into(), "ud-2".into()];
            }
            Defect::Wait(field, v) => match *field {
                "drain_timeout_ms" => {
                    // Only a graceful drain has a timeout to check.
                    r.drain = pb::DrainMode::Graceful as i32;
                    r.drain_timeout_ms = Some(*v);
                }
                "verify_stable_ms" => r.verify_stable_ms = Some(*v),
                "verify_timeout_ms" => r.verify_timeout_ms = Some(*v),
                "busy_retry_interval_ms" => r.busy_retry_interval_ms = Some(*v),
                _ => r.canary_soak_ms = Some(*v),
            },
            Defect::StableOverTimeout(s, t) => {
                r.verify_stable_ms = Some(*s);
                r.verify_timeout_ms = Some(*t);
            }
            Defect::Parallelism(n) => r.parallelism = Some(*n),
            Defect::BusyRetries(n) => r.busy_retries = Some(*n),
            Defect::ServerRetries(n) => r.server_retries = Some(*n),
        }
        invalid
    }
}

fn defect() -> BoxedStrategy<Defect> {
    let beyond = |max: u64| {
        prop_oneof![
            proptest::sample::select(vec![max + 1, u64::MAX, i64::MAX as u64, i64::MIN as u64]),
            (max + 1)..=u64::MAX,
        ]
    };
    prop_oneof![
        Just(Defect::PoolEmpty),
        bad_pool().prop_map(|(p, _)| Defect::PoolUnknown(p)),
        prop_oneof![
            bad_version(),
            proptest::sample::select(vec![" ", "\t", "\n", " 2.0", "2.0 ", "2 .0"])
                .prop_map(|v| (v.to_string(), "a version with whitespace")),
        ]
        .prop_map(|(v, _)| Defect::Version(v)),
        proptest::sample::select(vec!["", " ", "\t\n"])
            .prop_map(|a| Defect::ArtifactBlank(a.into())),
        (4096usize..12_000).prop_map(Defect::ArtifactTooLong),
        bad_digest().prop_map(Defect::Sha),
        unknown_enum(2).prop_map(Defect::Drain),
        unknown_enum(3).prop_map(Defect::OnExhausted),
        Just(Defect::FailoverWithoutPair),
        unknown_enum(2).prop_map(Defect::OnFailure),
        any::<bool>().prop_map(Defect::RollbackHalf),
        bad_digest().prop_map(Defect::RollbackSha),
        (
            odd_string().prop_filter("not a domain", |d| !DOMAINS.contains(&d.as_str())),
            any::<bool>()
        )
            .prop_map(|(d, alone)| Defect::DomainUnknown(d, alone)),
        Just(Defect::DomainMissing),
        Just(Defect::DomainTwice),
        (
            proptest::sample::select(vec![
                "drain_timeout_ms",
                "verify_stable_ms",
                "verify_timeout_ms",
                "busy_retry_interval_ms"
            ]),
            beyond(MAX_WAIT_MS)
        )
            .prop_map(|(f, v)| Defect::Wait(f, v)),
        beyond(MAX_SOAK_MS).prop_map(|v| Defect::Wait("canary_soak_ms", v)),
        (0..MAX_WAIT_MS, 1..=MAX_WAIT_MS).prop_map(|(t, extra)| {
            Defect::StableOverTimeout(t.saturating_add(extra).min(MAX_WAIT_MS), t)
        }),
        prop_oneof![Just(0u32), 10_001..=u32::MAX].prop_map(Defect::Parallelism),
        prop_oneof![Just(0u32), 101..=u32::MAX].prop_map(Defect::BusyRetries),
        (21..=u32::MAX).prop_map(Defect::ServerRetries),
    ]
    .boxed()
}

fn bad_starts() -> BoxedStrategy<Case> {
    (valid_start(), proptest::collection::vec(defect(), 1..=3))
        .prop_map(|(mut r, defects)| {
            let mut codes = Vec::new();
            for d in &defects {
                codes.extend(d.apply(&mut r));
            }
            case(
                Call::Start(Box::new(r)),
                Expect::Refused(codes),
                format!("defects: {defects:?}"),
            )
        })
        .boxed()
}

/// Anything in one field of a start request.
#[derive(Debug, Clone)]
enum Mutation {
    Pool(String),
    Version(String),
    Artifact(String),
    Sha(String),
    Enum(u8, i32),
    Wait(u8, Option<u64>),
    Count(u8, Option<u32>),
    DomainOrder(Vec<String>),
    Rollback(String, String),
}

impl Mutation {
    fn apply(&self, r: &mut pb::StartUpgradeRequest) {
        match self.clone() {
            Mutation::Pool(p) => r.pool = p,
            Mutation::Version(v) => r.version = v,
            Mutation::Artifact(a) => r.artifact = a,
            Mutation::Sha(s) => r.sha256 = s,
            Mutation::Enum(0, v) => r.drain = v,
            Mutation::Enum(1, v) => r.on_exhausted = v,
            Mutation::Enum(_, v) => r.on_failure = v,
            Mutation::Wait(0, v) => r.drain_timeout_ms = v,
            Mutation::Wait(1, v) => r.verify_stable_ms = v,
            Mutation::Wait(2, v) => r.verify_timeout_ms = v,
            Mutation::Wait(3, v) => r.busy_retry_interval_ms = v,
            Mutation::Wait(_, v) => r.canary_soak_ms = v,
            Mutation::Count(0, v) => r.parallelism = v,
            Mutation::Count(1, v) => r.busy_retries = v,
            Mutation::Count(_, v) => r.server_retries = v,
            Mutation::DomainOrder(d) => r.domain_order = d,
            Mutation::Rollback(a, s) => {
                r.rollback_artifact = a;
                r.rollback_sha256 = s;
            }
        }
    }
}

fn mutation() -> BoxedStrategy<Mutation> {
    let any_string = || prop_oneof![odd_string(), "[!-~]{1,40}"];
    prop_oneof![
        1 => any_string().prop_map(Mutation::Pool),
        4 => any_string().prop_map(Mutation::Version),
        2 => any_string().prop_map(Mutation::Artifact),
        2 => prop_oneof![
            any_string(),
            Just(format!(" {} ", SHA.to_uppercase())),
            "[0-9a-fA-F]{64}"
        ]
        .prop_map(Mutation::Sha),
        2 => (0..3u8, prop_oneof![0..=3i32, any::<i32>()])
            .prop_map(|(f, v)| Mutation::Enum(f, v)),
        3 => (
            0..5u8,
            proptest::option::of(prop_oneof![edge_u64(), 0..=MAX_WAIT_MS])
        )
            .prop_map(|(f, v)| Mutation::Wait(f, v)),
        2 => (
            0..3u8,
            proptest::option::of(prop_oneof![
                proptest::sample::select(vec![0u32, 1, 20, 21, 100, 101, 10_000, 10_001, u32::MAX]),
                any::<u32>()
            ])
        )
            .prop_map(|(f, v)| Mutation::Count(f, v)),
        2 => proptest::collection::vec(
            prop_oneof![proptest::sample::select(DOMAINS.to_vec()).prop_map(String::from), odd_string()],
            0..4
        )
        .prop_map(Mutation::DomainOrder),
        1 => (
            prop_oneof![Just(String::new()), any_string()],
            prop_oneof![Just(String::new()), Just(SHA.to_string()), any_string()]
        )
            .prop_map(|(a, s)| Mutation::Rollback(a, s)),
    ]
    .boxed()
}

/// Dry runs: a valid request with up to two fields set to anything. Refused, or a plan agents
/// can carry out; never stored.
fn dry_runs() -> BoxedStrategy<Case> {
    (valid_start(), proptest::collection::vec(mutation(), 0..=2))
        .prop_map(|(mut r, mutations)| {
            r.dry_run = true;
            for m in &mutations {
                m.apply(&mut r);
            }
            case(
                Call::Start(Box::new(r)),
                Expect::RefusedOrPlan(vec![Code::InvalidArgument, Code::NotFound]),
                format!("a dry run with {mutations:?}"),
            )
        })
        .boxed()
}

/// Roll-out calls. None ever runs: a command or a read finds none (NOT_FOUND); a start with
/// something wrong is refused, naming it; a dry run is refused or answered as one. Nothing is
/// stored.
fn rollout_calls() -> BoxedStrategy<Case> {
    let id = prop_oneof![Just(String::new()), odd_string(), "rollout-[0-9]{1,20}"];
    let commands = (id, 0..5u8).prop_map(|(id, which)| {
        let r = pb::RolloutRequest { id };
        let call = match which {
            0 => Call::GetRollout(r),
            1 => Call::WatchRollout(r),
            2 => Call::PauseRollout(r),
            3 => Call::ResumeRollout(r),
            _ => Call::AbortRollout(r),
        };
        case(
            call,
            refused(&[Code::NotFound]),
            "no roll-out was ever started",
        )
    });
    let rollout = |upgrade: pb::StartUpgradeRequest| pb::StartRolloutRequest {
        pools: vec![POOL.into()],
        upgrade: Some(pb::StartUpgradeRequest {
            pool: String::new(),
            ..upgrade
        }),
        ..Default::default()
    };
    // The plan of every pool is checked before anything starts: a defect of a start request
    // (other than its pool) refuses the roll-out.
    let bad_plans = (valid_start(), proptest::collection::vec(defect(), 1..=3))
        .prop_filter("a defect of the plan, not of its pool", |(_, d)| {
            d.iter()
                .all(|d| !matches!(d, Defect::PoolEmpty | Defect::PoolUnknown(_)))
        })
        .prop_map(move |(mut r, defects)| {
            let mut codes = Vec::new();
            for d in &defects {
                codes.extend(d.apply(&mut r));
            }
            case(
                Call::StartRollout(Box::new(rollout(r))),
                Expect::Refused(codes),
                format!("plan defects: {defects:?}"),
            )
        });
    let bad_shapes = (valid_start(), 0..7u8, bad_pool(), odd_string()).prop_map(
        move |(r, which, (unknown, codes), junk)| {
            let mut req = rollout(r);
            let (why, codes) = match which {
                0 => {
                    req.pools = vec![POOL.into(), unknown];
                    ("an unknown pool", codes)
                }
                1 => {
                    req.pools = vec![POOL.into(), POOL.into()];
                    ("a pool named twice", vec![Code::InvalidArgument])
                }
                2 => {
                    req.pools.clear();
                    ("neither pools nor a selector", vec![Code::InvalidArgument])
                }
                3 => {
                    req.selector = "tier=web".into();
                    ("both pools and a selector", vec![Code::InvalidArgument])
                }
                4 => {
                    req.pools.clear();
                    req.selector = if junk.is_empty() { "=".into() } else { junk };
                    (
                        "a selector that is not key=value or matches no pool",
                        vec![Code::InvalidArgument],
                    )
                }
                5 => {
                    req.canary = if unknown.is_empty() {
                        "x".into()
                    } else {
                        unknown
                    };
                    ("a canary outside the roll-out", vec![Code::InvalidArgument])
                }
                _ => {
                    req.max_in_flight = Some(0);
                    ("max_in_flight 0", vec![Code::InvalidArgument])
                }
            };
            case(
                Call::StartRollout(Box::new(req)),
                Expect::Refused(codes),
                why,
            )
        },
    );
    let dry = (
        valid_start(),
        proptest::collection::vec(mutation(), 0..=2),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(move |(r, mutations, max_in_flight)| {
            let mut req = rollout(r);
            if let Some(u) = req.upgrade.as_mut() {
                for m in &mutations {
                    m.apply(u);
                }
            }
            req.max_in_flight = max_in_flight;
            req.dry_run = true;
            case(
                Call::StartRollout(Box::new(req)),
                Expect::RefusedOrDryRollout(vec![Code::InvalidArgument, Code::NotFound]),
                format!("a roll-out dry run with {mutations:?}, max_in_flight {max_in_flight:?}"),
            )
        });
    prop_oneof![2 => commands, 2 => bad_plans, 2 => bad_shapes, 2 => dry].boxed()
}

fn cases() -> BoxedStrategy<Case> {
    (
        prop_oneof![3 => pool_calls(), 4 => bad_starts(), 3 => dry_runs(), 2 => rollout_calls()],
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(mut c, as_agent)| {
            if as_agent {
                c.as_agent = true;
                c.expect = refused(&[Code::PermissionDenied]);
                c.why = format!("the caller has the agent role, not operator ({})", c.why);
            }
            c
        })
        .boxed()
}

/// Checks a plan the coordinator accepted: agents must be able to carry it out.
fn check_plan(s: &pb::UpgradeStatus) -> Result<(), TestCaseError> {
    prop_assert!(
        s.dry_run,
        "a start that was asked as a dry run: {:?}",
        s.plan_id
    );
    let plan: Plan = serde_json::from_str(&s.plan_json).map_err(fail)?;
    plan.validate().map_err(fail)?;
    prop_assert!(
        version_ok(&plan.version),
        "accepted version {} that every agent refuses (1-128 printable ASCII, no spaces)",
        shown(&plan.version)
    );
    prop_assert_eq!(plan.pool.as_str(), POOL);
    let mut names: Vec<&str> = plan.domains.iter().map(|d| d.name.as_str()).collect();
    names.sort_unstable();
    prop_assert_eq!(names, DOMAINS.to_vec());
    Ok(())
}

/// What must not change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    store: String,
    upgrade: pb::UpgradeStatus,
    events: Vec<pb::Event>,
    leader: pb::LeaderResponse,
}

/// The store file (every key, byte for byte), the pool's upgrade and history, who leads.
async fn snapshot(
    store: &std::path::Path,
    operator: &OperatorClient<Channel>,
) -> anyhow::Result<Snapshot> {
    let mut c = operator.clone();
    let within = |what: &'static str| {
        move |_| anyhow::anyhow!("{what} did not answer within {CALL_LIMIT:?}")
    };
    let upgrade = tokio::time::timeout(
        CALL_LIMIT,
        c.get_upgrade(pb::PoolRequest { pool: POOL.into() }),
    )
    .await
    .map_err(within("GetUpgrade"))??
    .into_inner();
    let events = tokio::time::timeout(
        CALL_LIMIT,
        c.events(pb::EventsRequest {
            pool: POOL.into(),
            limit: 0,
            ..Default::default()
        }),
    )
    .await
    .map_err(within("Events"))??
    .into_inner()
    .events;
    let leader = tokio::time::timeout(CALL_LIMIT, c.leader(pb::LeaderRequest {}))
        .await
        .map_err(within("Leader"))??
        .into_inner();
    // The embedded store is a snapshot and a log beside it (either may not exist yet): what it
    // holds is both.
    let read = |p: &std::path::Path| match std::fs::read_to_string(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        r => r,
    };
    let mut log = store.as_os_str().to_owned();
    log.push(".log");
    Ok(Snapshot {
        store: format!(
            "{}\n--- log ---\n{}",
            read(store)?,
            read(std::path::Path::new(&log))?
        ),
        upgrade,
        events,
        leader,
    })
}

struct Daemon {
    _cluster: rollgate_tests::ClusterGuard,
    _tmp: tempfile::TempDir,
    _fleet: Fleet,
    coordinator: Mutex<CoordinatorProc>,
    operator: OperatorClient<Channel>,
    intruder: OperatorClient<Channel>,
    channel: Channel,
    store: PathBuf,
    baseline: Snapshot,
    /// The first failure that changed the coordinator's state, with its input.
    spoiled: Spoiled,
}

impl Daemon {
    async fn start() -> anyhow::Result<Daemon> {
        let cluster = rollgate_tests::cluster_lock().await?;
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_owned();
        let fleet = Fleet::start(&root, POOL, 2, 2, "1.0").await?;
        let store = root.join("store.json");
        let coordinator = CoordinatorProc::start(
            &root,
            "c1",
            &fleet.pki.issue(RoleKind::Coordinator, "c1")?,
            &format!(
                "[store]\nkind = \"embedded\"\npath = \"{}\"",
                store.display()
            ),
            // Two servers: one may go down at a time, so that the pool can be Ready.
            &fleet.pool_toml("min_active = 1"),
        )
        .await?;
        let op = fleet.pki.issue(RoleKind::Operator, "fuzz")?;
        let channel = rollgate_tests::channel(coordinator.addr, &op).await?;
        let operator = OperatorClient::new(channel.clone());
        let intruder =
            operator_client(coordinator.addr, &fleet.pki.issue(RoleKind::Agent, "fe-1")?).await?;
        eventually("the coordinator to lead", Duration::from_secs(30), || {
            let mut c = operator.clone();
            async move {
                let r = c.leader(pb::LeaderRequest {}).await.ok()?.into_inner();
                r.this_is_leader.then_some(())
            }
        })
        .await?;
        eventually("the pool to be Ready", Duration::from_secs(30), || {
            let mut c = operator.clone();
            async move {
                let r = c
                    .readiness(pb::PoolRequest { pool: POOL.into() })
                    .await
                    .ok()?
                    .into_inner();
                (r.state == pb::ReadinessState::Ready as i32).then_some(())
            }
        })
        .await?;
        let baseline = snapshot(&store, &operator).await?;
        Ok(Daemon {
            _cluster: cluster,
            _tmp: tmp,
            _fleet: fleet,
            coordinator: Mutex::new(coordinator),
            operator,
            intruder,
            channel,
            store,
            baseline,
            spoiled: Spoiled::default(),
        })
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        snapshot(&self.store, &self.operator).await
    }

    fn alive(&self) -> Result<(), TestCaseError> {
        let mut c = self.coordinator.lock().map_err(fail)?;
        if let Some(status) = c.exit_status().map_err(fail)? {
            return Err(fail(format!(
                "the coordinator exited ({status}):\n{}",
                log_tail(&c.log())
            )));
        }
        Ok(())
    }

    /// True while the coordinator runs and its state is as it started.
    async fn intact(&self) -> bool {
        self.alive().is_ok() && matches!(self.snapshot().await, Ok(now) if now == self.baseline)
    }

    async fn unchanged(&self) -> Result<(), TestCaseError> {
        self.alive()?;
        let now = self.snapshot().await.map_err(fail)?;
        prop_assert_eq!(&now, &self.baseline, "the coordinator's state changed");
        Ok(())
    }

    async fn send(&self, c: &Case) -> Result<Answer, tonic::Status> {
        let mut client = if c.as_agent {
            self.intruder.clone()
        } else {
            self.operator.clone()
        };
        let upgrade = match c.call.clone() {
            Call::Readiness(r) => client.readiness(r).await.map(|_| None)?,
            Call::Inventory => client
                .inventory(pb::InventoryRequest {})
                .await
                .map(|_| None)?,
            Call::Start(r) => Some(client.start_upgrade(*r).await?.into_inner()),
            Call::Get(r) => Some(client.get_upgrade(r).await?.into_inner()),
            Call::Watch(r) => {
                let mut s = client.watch_upgrade(r).await?.into_inner();
                s.message().await?
            }
            Call::Pause(r) => Some(client.pause_upgrade(r).await?.into_inner()),
            Call::Resume(r) => Some(client.resume_upgrade(r).await?.into_inner()),
            Call::Abort(r) => Some(client.abort_upgrade(r).await?.into_inner()),
            Call::Rollback(r) => Some(client.rollback_upgrade(r).await?.into_inner()),
            Call::Failover(r) => client.failover(r).await.map(|_| None)?,
            Call::Failback(r) => client.failback(r).await.map(|_| None)?,
            Call::Events(r) => client.events(r).await.map(|_| None)?,
            Call::History(r) => client.history(r).await.map(|_| None)?,
            Call::Leader => client.leader(pb::LeaderRequest {}).await.map(|_| None)?,
            Call::StartRollout(r) => {
                let s = client.start_rollout(*r).await?.into_inner();
                return Ok(Answer::Rollout(Box::new(s)));
            }
            Call::GetRollout(r) => {
                return Ok(Answer::Rollout(Box::new(
                    client.get_rollout(r).await?.into_inner(),
                )))
            }
            Call::WatchRollout(r) => {
                let mut s = client.watch_rollout(r).await?.into_inner();
                return Ok(s
                    .message()
                    .await?
                    .map_or(Answer::Upgrade(None), |s| Answer::Rollout(Box::new(s))));
            }
            Call::PauseRollout(r) => {
                return Ok(Answer::Rollout(Box::new(
                    client.pause_rollout(r).await?.into_inner(),
                )))
            }
            Call::ResumeRollout(r) => {
                return Ok(Answer::Rollout(Box::new(
                    client.resume_rollout(r).await?.into_inner(),
                )))
            }
            Call::AbortRollout(r) => {
                return Ok(Answer::Rollout(Box::new(
                    client.abort_rollout(r).await?.into_inner(),
                )))
            }
        };
        Ok(Answer::Upgrade(upgrade.map(Box::new)))
    }

    /// Runs one case, unless an earlier one spoiled the daemon (see [`Spoiled`]).
    async fn guarded(
        &self,
        input: String,
        case: impl std::future::Future<Output = Result<(), TestCaseError>>,
    ) -> Result<(), TestCaseError> {
        self.spoiled.guarded(input, case, || self.intact()).await
    }

    async fn check(&self, c: Case) -> Result<(), TestCaseError> {
        self.guarded(format!("{c:#?}"), self.check_once(c.clone()))
            .await
    }

    async fn check_raw(
        &self,
        path: &'static str,
        body: Vec<u8>,
        expect: Raw,
    ) -> Result<(), TestCaseError> {
        let input = format!("{path} {body:?} expecting {expect:?}");
        self.guarded(input, self.check_raw_once(path, body, expect))
            .await
    }

    async fn check_once(&self, c: Case) -> Result<(), TestCaseError> {
        let answer = tokio::time::timeout(CALL_LIMIT, self.send(&c))
            .await
            .map_err(|_| fail(format!("no answer within {CALL_LIMIT:?} (a hang)")))?;
        match (&c.expect, answer) {
            (Expect::Refused(codes) | Expect::RefusedOrPlan(codes), Err(s)) => {
                check_refusal(&s, codes)?;
            }
            (Expect::Refused(_), Ok(r)) => {
                return Err(fail(format!("accepted, though {}: {r:?}", c.why)));
            }
            (Expect::Answered, Err(s)) => {
                return Err(fail(format!(
                    "refused ({:?}: {}), though {}",
                    s.code(),
                    shown(s.message()),
                    c.why
                )));
            }
            (Expect::Answered, Ok(Answer::Upgrade(Some(s)))) => {
                prop_assert_eq!(
                    s.status,
                    pb::UpgradeState::None as i32,
                    "an upgrade appeared: {:?}",
                    s
                );
            }
            (Expect::Answered, Ok(_)) => {}
            (Expect::RefusedOrPlan(_), Ok(Answer::Upgrade(s))) => {
                check_plan(&*s.ok_or_else(|| fail("a start without a status"))?)?;
            }
            (Expect::RefusedOrDryRollout(codes), Err(s)) => check_refusal(&s, codes)?,
            (Expect::RefusedOrDryRollout(_), Ok(Answer::Rollout(r))) => {
                prop_assert!(r.dry_run, "a roll-out asked as a dry run: {:?}", r);
                prop_assert_eq!(&r.pools.len(), &1usize);
                prop_assert!(r.max_in_flight >= 1, "{:?}", r);
            }
            (expect, Ok(other)) => {
                return Err(fail(format!("answered {other:?}, expecting {expect:?}")));
            }
        }
        self.unchanged().await
    }

    async fn check_raw_once(
        &self,
        path: &'static str,
        body: Vec<u8>,
        expect: Raw,
    ) -> Result<(), TestCaseError> {
        let send = async {
            if path.ends_with("/WatchUpgrade") || path.ends_with("/WatchRollout") {
                raw_first(&self.channel, path, body).await
            } else {
                raw_unary(&self.channel, path, body).await
            }
        };
        let answer = tokio::time::timeout(CALL_LIMIT, send)
            .await
            .map_err(|_| fail(format!("no answer within {CALL_LIMIT:?} (a hang)")))?;
        match (expect, answer) {
            (Raw::Undecodable, Err(s)) => check_undecodable(&s)?,
            (Raw::Undecodable, Ok(())) => {
                return Err(fail("bytes that do not decode were accepted"))
            }
            (Raw::Like(Expect::Refused(codes)), Err(s)) => check_refusal(&s, &codes)?,
            (Raw::Like(Expect::Refused(_)), Ok(())) => {
                return Err(fail("accepted, though refused without the unknown fields"))
            }
            (Raw::Like(Expect::Answered), Err(s)) => {
                return Err(fail(format!(
                    "refused ({:?}: {}), though answered without the unknown fields",
                    s.code(),
                    shown(s.message())
                )))
            }
            (
                Raw::Like(Expect::RefusedOrPlan(codes) | Expect::RefusedOrDryRollout(codes)),
                Err(s),
            ) => check_refusal(&s, &codes)?,
            (Raw::Like(_), Ok(())) => {}
            (Raw::Inert, Err(s)) => check_refusal(&s, &ALL_CLEAR)?,
            (Raw::Inert, Ok(())) => {}
        }
        self.unchanged().await
    }
}

#[derive(Debug, Clone)]
enum Raw {
    Undecodable,
    Like(Expect),
    Inert,
}

/// What `bytes` decode to as `path`'s request; `None` for a start of the configured pool that is
/// not a dry run (it might be valid, and would start an upgrade).
fn classify(path: &str, bytes: &[u8]) -> Option<Raw> {
    let method = path.rsplit('/').next().unwrap_or_default();
    let decoded = match method {
        "Inventory" => pb::InventoryRequest::decode(bytes).map(|_| false),
        "Leader" => pb::LeaderRequest::decode(bytes).map(|_| false),
        "StartUpgrade" => {
            pb::StartUpgradeRequest::decode(bytes).map(|r| r.pool == POOL && !r.dry_run)
        }
        "Events" => pb::EventsRequest::decode(bytes).map(|_| false),
        // Any roll-out that is not a dry run might be valid (a selector, a pool list).
        "StartRollout" => pb::StartRolloutRequest::decode(bytes).map(|r| !r.dry_run),
        "GetRollout" | "WatchRollout" | "PauseRollout" | "ResumeRollout" | "AbortRollout" => {
            pb::RolloutRequest::decode(bytes).map(|_| false)
        }
        _ => pb::PoolRequest::decode(bytes).map(|_| false),
    };
    match decoded {
        Err(_) => Some(Raw::Undecodable),
        Ok(false) => Some(Raw::Inert),
        Ok(true) => None,
    }
}

const PATHS: [&str; 19] = [
    "/rollgate.operator.v1.Operator/Readiness",
    "/rollgate.operator.v1.Operator/Inventory",
    "/rollgate.operator.v1.Operator/StartUpgrade",
    "/rollgate.operator.v1.Operator/GetUpgrade",
    "/rollgate.operator.v1.Operator/WatchUpgrade",
    "/rollgate.operator.v1.Operator/PauseUpgrade",
    "/rollgate.operator.v1.Operator/ResumeUpgrade",
    "/rollgate.operator.v1.Operator/AbortUpgrade",
    "/rollgate.operator.v1.Operator/RollbackUpgrade",
    "/rollgate.operator.v1.Operator/Failover",
    "/rollgate.operator.v1.Operator/Failback",
    "/rollgate.operator.v1.Operator/Events",
    "/rollgate.operator.v1.Operator/Leader",
    "/rollgate.operator.v1.Operator/StartRollout",
    "/rollgate.operator.v1.Operator/GetRollout",
    "/rollgate.operator.v1.Operator/WatchRollout",
    "/rollgate.operator.v1.Operator/PauseRollout",
    "/rollgate.operator.v1.Operator/ResumeRollout",
    "/rollgate.operator.v1.Operator/AbortRollout",
];

fn raw_inputs() -> BoxedStrategy<(&'static str, Vec<u8>, Option<Raw>)> {
    let garbage = (
        proptest::sample::select(PATHS.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(path, bytes)| {
            let expect = classify(path, &bytes);
            (path, bytes, expect)
        });
    let spoiled = (cases(), spoil_how()).prop_map(|(c, how)| {
        let path = c.call.path();
        let bytes = spoil(c.call.encode(), &how);
        let expect = classify(path, &bytes);
        (path, bytes, expect)
    });
    let extended = (cases(), unknown_fields())
        .prop_filter("the operator role", |(c, _)| !c.as_agent)
        .prop_map(|(c, extra)| {
            let mut bytes = c.call.encode();
            bytes.extend_from_slice(&extra);
            (c.call.path(), bytes, Some(Raw::Like(c.expect)))
        });
    prop_oneof![2 => garbage, 2 => spoiled, 1 => extended].boxed()
}

/// Cases per run, within the fuzz module's budget of about a minute in a debug build (each costs about 2 ms).
const TYPED_CASES: u32 = 1000;
const RAW_CASES: u32 = 500;

#[test]
fn every_operator_rpc_refuses_bad_input_clearly_and_changes_nothing() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let d = rt.block_on(Daemon::start())?;
    let mut failed: Vec<String> = regressions()
        .into_iter()
        .filter_map(|(name, c)| {
            let r = rt.block_on(d.check(c.clone()));
            r.err()
                .map(|e| format!("regression {name}: {e}\ninput: {c:?}"))
        })
        .collect();
    if let Some(first) = d.spoiled.take()? {
        failed.push(format!("a regression changed the daemon's state: {first}"));
    }
    anyhow::ensure!(failed.is_empty(), "{}", failed.join("\n\n"));
    let t0 = std::time::Instant::now();
    report(
        "typed requests",
        runner(TYPED_CASES).run(&cases(), |c| rt.block_on(d.check(c))),
        &d.spoiled,
    )?;
    report(
        "raw bytes",
        runner(RAW_CASES).run(&raw_inputs(), |(path, bytes, expect)| {
            let Some(expect) = expect else {
                return Err(TestCaseError::reject("these bytes may carry a valid start"));
            };
            rt.block_on(d.check_raw(path, bytes, expect))
        }),
        &d.spoiled,
    )?;
    eprintln!(
        "operator fuzz: {} cases in {:.1?}",
        TYPED_CASES + RAW_CASES,
        t0.elapsed()
    );
    Ok(())
}

/// Inputs the fuzzing found mishandled, cut down by hand to what matters, kept as named cases
/// (run first, every time). A call that changed state is last: it spoils the ones after it.
fn regressions() -> Vec<(&'static str, Case)> {
    let start = |version: &str, dry_run: bool, domain_order: Vec<String>| {
        Call::Start(Box::new(pb::StartUpgradeRequest {
            pool: POOL.into(),
            version: version.into(),
            artifact: NOWHERE.into(),
            sha256: SHA.into(),
            domain_order,
            dry_run,
            ..Default::default()
        }))
    };
    let invalid = refused(&[Code::InvalidArgument]);
    vec![
        (
            "a 4 KiB pool name of control characters: the escaped echo outgrew HTTP/2's 16 KiB \
             of headers (INTERNAL)",
            case(
                Call::Readiness(pb::PoolRequest {
                    pool: "\u{1}".repeat(4 * 1024),
                }),
                refused(&[Code::NotFound, Code::InvalidArgument]),
                "no such pool",
            ),
        ),
        (
            "a 10 KiB domain name of NULs in domain_order: the same",
            case(
                start("2.0", true, vec!["\0".repeat(10 * 1024)]),
                invalid.clone(),
                "no such domain",
            ),
        ),
        (
            "a dry run with version \"\\0\": a plan every agent refuses",
            case(
                start("\0", true, Vec::new()),
                invalid.clone(),
                "not a version",
            ),
        ),
        (
            "version \"2 .0\": an upgrade started that every agent refuses at its first server",
            case(start("2 .0", false, Vec::new()), invalid, "not a version"),
        ),
    ]
}
