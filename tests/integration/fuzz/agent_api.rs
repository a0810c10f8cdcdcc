//! The agent's gRPC surface under generated bad input, against one real agent process driving a
//! real sample front end over mTLS, reused by every case.
//!
//! The service serves throughout and the agent holds epoch [`E`] and one journaled operation
//! ([`SEED`], a verify). Every generated call is either invalid for a stated reason (`why`) and
//! must be refused with a clear status, or one that may succeed but changes nothing (fence at
//! the current epoch, the seed's replay, a rollback preparation with nothing to do, the
//! read-only calls). After every call: the agent process still runs and answers Health, and its
//! epoch, journal, service record, artifact cache and reported health are as before.

use super::wire::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;
use rollgate_common::config::MAX_OPERATION_ID_LEN;
use rollgate_common::tls::RoleKind;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_client::AgentClient;
use rollgate_tests::{eventually, AgentProc, FrontEnd, Pki};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// The agent's epoch for the whole run: epochs 1..E are stale.
const E: u64 = 1_000;
/// The one operation in the journal.
const SEED: &str = "fuzz/seed-verify";
/// The installed version.
const INSTALLED: &str = "1.0";

/// What a call must do.
#[derive(Debug, Clone)]
enum Expect {
    /// Refused with one of these codes.
    Refused(Vec<Code>),
    /// Answered (and, like every case, nothing changed).
    Answered,
}

#[derive(Debug, Clone)]
enum Call {
    Health,
    Watch,
    Fence(pb::FenceRequest),
    Drain(pb::DrainRequest),
    Stop(pb::StopRequest),
    Install(pb::InstallPatchRequest),
    Rollback(pb::RollbackRequest),
    Restart(pb::RestartRequest),
    Verify(pb::VerifyRequest),
    Status(pb::OperationStatusRequest),
}

impl Call {
    /// Calls only the coordinator role may make.
    fn writes(&self) -> bool {
        !matches!(self, Call::Health | Call::Watch | Call::Status(_))
    }

    fn path(&self) -> &'static str {
        match self {
            Call::Health => "/rollgate.agent.v1.Agent/Health",
            Call::Watch => "/rollgate.agent.v1.Agent/Watch",
            Call::Fence(_) => "/rollgate.agent.v1.Agent/Fence",
            Call::Drain(_) => "/rollgate.agent.v1.Agent/Drain",
            Call::Stop(_) => "/rollgate.agent.v1.Agent/Stop",
            Call::Install(_) => "/rollgate.agent.v1.Agent/InstallPatch",
            Call::Rollback(_) => "/rollgate.agent.v1.Agent/Rollback",
            Call::Restart(_) => "/rollgate.agent.v1.Agent/Restart",
            Call::Verify(_) => "/rollgate.agent.v1.Agent/Verify",
            Call::Status(_) => "/rollgate.agent.v1.Agent/OperationStatus",
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Call::Health => pb::HealthRequest {}.encode_to_vec(),
            Call::Watch => pb::WatchRequest {}.encode_to_vec(),
            Call::Fence(r) => r.encode_to_vec(),
            Call::Drain(r) => r.encode_to_vec(),
            Call::Stop(r) => r.encode_to_vec(),
            Call::Install(r) => r.encode_to_vec(),
            Call::Rollback(r) => r.encode_to_vec(),
            Call::Restart(r) => r.encode_to_vec(),
            Call::Verify(r) => r.encode_to_vec(),
            Call::Status(r) => r.encode_to_vec(),
        }
    }
}

/// One generated call, what it must do, and why.
#[derive(Debug, Clone)]
struct Case {
    call: Call,
    as_operator: bool,
    expect: Expect,
    why: String,
}

fn case(call: Call, expect: Expect, why: impl Into<String>) -> Case {
    Case {
        call,
        as_operator: false,
        expect,
        why: why.into(),
    }
}

fn refused(codes: &[Code]) -> Expect {
    Expect::Refused(codes.to_vec())
}

fn header(id: &str, epoch: u64) -> Option<pb::OperationHeader> {
    Some(pb::OperationHeader {
        operation_id: id.into(),
        epoch,
    })
}

/// A well-formed operation id that is not in the journal, odd ones included.
fn fresh_id() -> BoxedStrategy<String> {
    prop_oneof![
        "[!-~]{1,128}",
        "[!-~]{129,512}",
        proptest::sample::select(vec![
            "..".to_string(),
            "/".into(),
            "election/1".into(),
            "/rollgate/test/upgrade/pool-a".into(),
            "%00".into(),
            "a/../../b".into(),
            "x".repeat(128),
            "x".repeat(MAX_OPERATION_ID_LEN),
            "setup/fe-1/stop".into(),
        ]),
    ]
    .prop_filter("not the journaled id", |id| id != SEED)
    .boxed()
}

/// A header that must be refused, the code it gets, and why.
fn bad_header() -> BoxedStrategy<(Option<pb::OperationHeader>, Code, String)> {
    let bad_id = prop_oneof![
        Just((String::new(), "an empty operation id")),
        prop_oneof![
            Just("x".repeat(MAX_OPERATION_ID_LEN + 1)),
            "[!-~]{513,700}",
            Just("y".repeat(10 * 1024))
        ]
        .prop_map(|id| (id, "an operation id over 512 characters")),
        ("[!-~]{0,20}", bad_char(), "[!-~]{0,20}").prop_map(|(a, c, b)| (
            format!("{a}{c}{b}"),
            "an operation id with a space, a control character or non-ASCII"
        )),
        Just(("\0".repeat(10 * 1024), "an operation id of 10 KiB of NULs")),
    ];
    prop_oneof![
        Just((
            None,
            Code::InvalidArgument,
            "no header: no operation id and no epoch".to_string()
        )),
        (bad_id, edge_u64()).prop_map(|((id, why), epoch)| (
            header(&id, epoch),
            Code::InvalidArgument,
            why.to_string()
        )),
        fresh_id().prop_map(|id| (
            header(&id, 0),
            Code::InvalidArgument,
            "epoch 0 is no leader's epoch".to_string()
        )),
        (fresh_id(), 1..E).prop_map(|(id, epoch)| (
            header(&id, epoch),
            Code::FailedPrecondition,
            format!("epoch {epoch} is older than the agent's {E}")
        )),
    ]
    .boxed()
}

/// A duration beyond the 24 h bound.
fn too_long() -> BoxedStrategy<u64> {
    prop_oneof![
        proptest::sample::select(vec![
            MAX_WAIT_MS + 1,
            u64::MAX,
            i64::MAX as u64,
            i64::MIN as u64
        ]),
        (MAX_WAIT_MS + 1)..=u64::MAX,
    ]
    .boxed()
}

/// A duration the agent accepts: 0 (its default) up to the bound.
fn ok_wait() -> BoxedStrategy<u64> {
    prop_oneof![Just(0u64), Just(1), Just(MAX_WAIT_MS), 0..=MAX_WAIT_MS].boxed()
}

/// Artifact sources, each refused with the codes given (with a digest that matches nothing).
fn bad_source(state_dir: PathBuf, config: PathBuf) -> BoxedStrategy<(String, Vec<Code>, String)> {
    let invalid =
        |s: &str, why: &str| (s.to_string(), vec![Code::InvalidArgument], why.to_string());
    let state = state_dir.display().to_string();
    let cfg = config.display().to_string();
    // Under the agent's artifact_dirs (the test root), where a missing file is NOT_FOUND.
    let missing = state_dir
        .parent()
        .map(|root| root.join("no-such-fuzz-artifact").display().to_string())
        .unwrap_or_default();
    prop_oneof![
        proptest::sample::select(vec![
            invalid("", "an empty artifact source"),
            invalid("ftp://host/x", "a scheme the agent does not fetch"),
            invalid(
                "file://relative/x",
                "a file:// URL without an absolute path"
            ),
            invalid("file://", "a file:// URL without a path"),
            invalid("gopher://x", "a scheme the agent does not fetch"),
            invalid("://x", "a URL without a scheme"),
            invalid("http://", "an http URL without a host"),
            invalid("http://[::1", "an http URL that does not parse"),
            invalid("https://exa mple/x", "an https URL that does not parse"),
            invalid(
                "http://127.0.0.1:99999/x",
                "an http URL with a port out of range"
            ),
            invalid("/", "a directory, not a file"),
            invalid(".", "a directory, not a file"),
            invalid("..", "a directory, not a file"),
            invalid(&state, "a directory (the agent's own state), not a file"),
            invalid("file:///", "a directory, not a file"),
            invalid(&cfg, "a file whose sha256 is not the one given"),
            (
                "Cargo.toml".to_string(),
                vec![Code::InvalidArgument, Code::NotFound],
                "a relative path, to a file whose sha256 is not the one given if it exists"
                    .to_string()
            ),
            invalid(
                "/nonexistent/fuzz-artifact",
                "a local path outside artifact_dirs"
            ),
            invalid(
                "file:///nonexistent/fuzz-artifact",
                "a local path outside artifact_dirs"
            ),
            (
                missing.clone(),
                vec![Code::NotFound],
                "a file under artifact_dirs that does not exist".to_string()
            ),
            (
                format!("file://{missing}"),
                vec![Code::NotFound],
                "a file under artifact_dirs that does not exist".to_string()
            ),
            (
                "http://127.0.0.1:1/fuzz-artifact".to_string(),
                vec![Code::Unavailable],
                "a server that refuses the connection".to_string()
            ),
        ]),
        (
            proptest::sample::select(vec!['\0', '\n', '\t']),
            "[a-z/]{0,10}"
        )
            .prop_map(|(c, rest)| (
                format!("/nonexistent/{rest}{c}x"),
                vec![Code::InvalidArgument, Code::NotFound],
                "a path with a NUL, newline or tab that names no file".to_string()
            )),
        odd_string()
            .prop_filter("not empty", |s| !s.is_empty())
            .prop_map(|s| (
                format!("/nonexistent/{s}"),
                vec![Code::InvalidArgument, Code::NotFound],
                "an odd path that names no file".to_string()
            )),
    ]
    .boxed()
}

/// Every invalid or inert call, for the coordinator role.
fn cases(state_dir: PathBuf, config: PathBuf) -> BoxedStrategy<Case> {
    let drain = prop_oneof![
        (bad_header(), edge_u64(), any::<i32>()).prop_map(|((h, code, why), timeout_ms, on)| case(
            Call::Drain(pb::DrainRequest {
                header: h,
                timeout_ms,
                on_timeout: on,
            }),
            refused(&[code, Code::InvalidArgument]),
            why
        )),
        (fresh_id(), edge_u64(), unknown_enum(2)).prop_map(|(id, timeout_ms, on)| case(
            Call::Drain(pb::DrainRequest {
                header: header(&id, E),
                timeout_ms,
                on_timeout: on,
            }),
            refused(&[Code::InvalidArgument]),
            format!("on_timeout {on} is no DrainTimeoutAction")
        )),
        (fresh_id(), too_long(), 0..=2i32).prop_map(|(id, timeout_ms, on)| case(
            Call::Drain(pb::DrainRequest {
                header: header(&id, E),
                timeout_ms,
                on_timeout: on,
            }),
            refused(&[Code::InvalidArgument]),
            format!("timeout_ms {timeout_ms} is beyond 24 h")
        )),
        (ok_wait(), 0..=2i32).prop_map(|(timeout_ms, on)| case(
            Call::Drain(pb::DrainRequest {
                header: header(SEED, E),
                timeout_ms,
                on_timeout: on,
            }),
            refused(&[Code::FailedPrecondition]),
            "the id is journaled as a verify"
        )),
    ];
    let stop = prop_oneof![
        bad_header().prop_map(|(h, code, why)| case(
            Call::Stop(pb::StopRequest { header: h }),
            refused(&[code]),
            why
        )),
        Just(case(
            Call::Stop(pb::StopRequest {
                header: header(SEED, E),
            }),
            refused(&[Code::FailedPrecondition]),
            "the id is journaled as a verify"
        )),
    ];
    let any_install = (
        odd_string(),
        prop_oneof![odd_string(), "[0-9a-f]{64}"],
        prop_oneof![odd_string(), "[!-~]{1,20}"],
        edge_u64(),
        any::<bool>(),
    );
    let install = prop_oneof![
        (bad_header(), any_install).prop_map(
            |((h, code, why), (artifact, sha256, version, timeout_ms, prepare_only))| case(
                Call::Install(pb::InstallPatchRequest {
                    header: h,
                    artifact,
                    sha256,
                    version,
                    timeout_ms,
                    prepare_only,
                }),
                refused(&[code, Code::InvalidArgument]),
                why
            )
        ),
        (
            fresh_id(),
            bad_version(),
            odd_string(),
            "[0-9a-f]{64}",
            ok_wait(),
            any::<bool>()
        )
            .prop_map(
                |(id, (version, why), artifact, sha256, timeout_ms, prepare_only)| case(
                    Call::Install(pb::InstallPatchRequest {
                        header: header(&id, E),
                        artifact,
                        sha256,
                        version,
                        timeout_ms,
                        prepare_only,
                    }),
                    refused(&[Code::InvalidArgument]),
                    why
                )
            ),
        (
            fresh_id(),
            bad_digest(),
            "[!-~]{1,20}",
            odd_string(),
            ok_wait(),
            any::<bool>()
        )
            .prop_map(
                |(id, sha256, version, artifact, timeout_ms, prepare_only)| case(
                    Call::Install(pb::InstallPatchRequest {
                        header: header(&id, E),
                        artifact,
                        sha256,
                        version,
                        timeout_ms,
                        prepare_only,
                    }),
                    refused(&[Code::InvalidArgument]),
                    "the sha256 is not 64 hex digits"
                )
            ),
        (
            fresh_id(),
            bad_source(state_dir, config),
            "[0-9a-f]{64}",
            "[!-~]{1,20}",
            ok_wait(),
            any::<bool>()
        )
            .prop_map(
                |(id, (artifact, codes, why), sha256, version, timeout_ms, prepare_only)| case(
                    Call::Install(pb::InstallPatchRequest {
                        header: header(&id, E),
                        artifact,
                        sha256,
                        version,
                        timeout_ms,
                        prepare_only,
                    }),
                    refused(&codes),
                    why
                )
            ),
        (fresh_id(), too_long(), "[0-9a-f]{64}", any::<bool>()).prop_map(
            |(id, timeout_ms, sha256, prepare_only)| case(
                Call::Install(pb::InstallPatchRequest {
                    header: header(&id, E),
                    artifact: "/nonexistent/fuzz-artifact".into(),
                    sha256,
                    version: "2.0".into(),
                    timeout_ms,
                    prepare_only,
                }),
                refused(&[Code::InvalidArgument]),
                format!("timeout_ms {timeout_ms} is beyond 24 h")
            )
        ),
    ];
    let any_rollback = (
        edge_u64(),
        odd_string(),
        any::<bool>(),
        odd_string(),
        prop_oneof![odd_string(), "[0-9a-f]{64}"],
    );
    let ok_from = prop_oneof![
        Just(String::new()),
        Just(INSTALLED.to_string()),
        "[!-~]{1,20}"
    ];
    let rollback = prop_oneof![
        (bad_header(), any_rollback).prop_map(
            |((h, code, why), (timeout_ms, from_version, prepare_only, fa, fs))| case(
                Call::Rollback(pb::RollbackRequest {
                    header: h,
                    timeout_ms,
                    from_version,
                    prepare_only,
                    fallback_artifact: fa,
                    fallback_sha256: fs,
                }),
                refused(&[code, Code::InvalidArgument]),
                why
            )
        ),
        (
            fresh_id(),
            odd_string(),
            "[0-9a-f]{64}",
            any::<bool>(),
            any::<bool>()
        )
            .prop_filter("one half given", |(_, a, _, _, _)| !a.is_empty())
            .prop_map(|(id, artifact, sha, sha_only, prepare_only)| {
                let (fallback_artifact, fallback_sha256) = if sha_only {
                    (String::new(), sha)
                } else {
                    (artifact, String::new())
                };
                case(
                    Call::Rollback(pb::RollbackRequest {
                        header: header(&id, E),
                        prepare_only,
                        fallback_artifact,
                        fallback_sha256,
                        ..Default::default()
                    }),
                    refused(&[Code::InvalidArgument]),
                    "only one of fallback_artifact and fallback_sha256",
                )
            }),
        (fresh_id(), bad_digest(), any::<bool>())
            .prop_filter("a digest given", |(_, s, _)| !s.is_empty())
            .prop_map(|(id, sha, prepare_only)| case(
                Call::Rollback(pb::RollbackRequest {
                    header: header(&id, E),
                    prepare_only,
                    fallback_artifact: "/nonexistent/fuzz-artifact".into(),
                    fallback_sha256: sha,
                    ..Default::default()
                }),
                refused(&[Code::InvalidArgument]),
                "fallback_sha256 is not 64 hex digits"
            )),
        (fresh_id(), bad_version(), any::<bool>())
            .prop_filter("from_version given", |(_, (v, _), _)| !v.is_empty())
            .prop_map(|(id, (from_version, why), prepare_only)| case(
                Call::Rollback(pb::RollbackRequest {
                    header: header(&id, E),
                    from_version,
                    prepare_only,
                    ..Default::default()
                }),
                refused(&[Code::InvalidArgument]),
                format!("from_version: {why}")
            )),
        (fresh_id(), too_long(), any::<bool>()).prop_map(|(id, timeout_ms, prepare_only)| case(
            Call::Rollback(pb::RollbackRequest {
                header: header(&id, E),
                timeout_ms,
                prepare_only,
                ..Default::default()
            }),
            refused(&[Code::InvalidArgument]),
            format!("timeout_ms {timeout_ms} is beyond 24 h")
        )),
        (fresh_id(), ok_wait(), ok_from).prop_map(|(id, timeout_ms, from_version)| case(
            Call::Rollback(pb::RollbackRequest {
                header: header(&id, E),
                timeout_ms,
                from_version,
                ..Default::default()
            }),
            refused(&[Code::FailedPrecondition]),
            "a rollback while the service serves (and with nothing to roll back to)"
        )),
        (
            fresh_id(),
            prop_oneof![Just(String::new()), Just(INSTALLED.to_string())]
        )
            .prop_map(|(id, from_version)| case(
                Call::Rollback(pb::RollbackRequest {
                    header: header(&id, E),
                    from_version,
                    prepare_only: true,
                    ..Default::default()
                }),
                refused(&[Code::FailedPrecondition]),
                "no version before the installed one is known: nothing to roll back to"
            )),
        (fresh_id(), "[!-~]{1,128}")
            .prop_filter("not the installed version", |(_, v)| v != INSTALLED)
            .prop_map(|(id, from_version)| case(
                Call::Rollback(pb::RollbackRequest {
                    header: header(&id, E),
                    from_version,
                    prepare_only: true,
                    ..Default::default()
                }),
                Expect::Answered,
                "preparing a rollback from a version that is not installed: nothing to do"
            )),
    ];
    let restart = prop_oneof![
        (bad_header(), edge_u64(), any::<bool>(), edge_u64()).prop_map(
            |((h, code, why), timeout_ms, drain_if_accepting, drain_timeout_ms)| case(
                Call::Restart(pb::RestartRequest {
                    header: h,
                    timeout_ms,
                    drain_if_accepting,
                    drain_timeout_ms,
                }),
                refused(&[code, Code::InvalidArgument]),
                why
            )
        ),
        (
            fresh_id(),
            too_long(),
            ok_wait(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(id, long, ok, which, drain_if_accepting)| {
                let (timeout_ms, drain_timeout_ms) = if which { (long, ok) } else { (ok, long) };
                case(
                    Call::Restart(pb::RestartRequest {
                        header: header(&id, E),
                        timeout_ms,
                        drain_if_accepting,
                        drain_timeout_ms,
                    }),
                    refused(&[Code::InvalidArgument]),
                    format!("a timeout of {long} ms is beyond 24 h"),
                )
            }),
        (ok_wait(), any::<bool>(), ok_wait()).prop_map(|(timeout_ms, d, drain_timeout_ms)| case(
            Call::Restart(pb::RestartRequest {
                header: header(SEED, E),
                timeout_ms,
                drain_if_accepting: d,
                drain_timeout_ms,
            }),
            refused(&[Code::FailedPrecondition]),
            "the id is journaled as a verify"
        )),
    ];
    let verify = prop_oneof![
        (bad_header(), proptest::option::of(edge_u64()), edge_u64()).prop_map(
            |((h, code, why), stable_ms, timeout_ms)| case(
                Call::Verify(pb::VerifyRequest {
                    header: h,
                    stable_ms,
                    timeout_ms,
                }),
                refused(&[code, Code::InvalidArgument]),
                why
            )
        ),
        (fresh_id(), 1..MAX_WAIT_MS, 1..=MAX_WAIT_MS).prop_map(|(id, timeout_ms, extra)| {
            let stable = timeout_ms.saturating_add(extra).min(MAX_WAIT_MS);
            case(
                Call::Verify(pb::VerifyRequest {
                    header: header(&id, E),
                    stable_ms: Some(stable),
                    timeout_ms,
                }),
                refused(&[Code::InvalidArgument]),
                format!("stable_ms {stable} is longer than timeout_ms {timeout_ms}"),
            )
        }),
        (
            fresh_id(),
            proptest::option::of(prop_oneof![ok_wait(), too_long()]),
            prop_oneof![ok_wait(), too_long()]
        )
            .prop_filter("a duration beyond 24 h", |(_, s, t)| {
                *t > MAX_WAIT_MS || s.is_some_and(|s| s > MAX_WAIT_MS)
            })
            .prop_map(|(id, stable_ms, timeout_ms)| case(
                Call::Verify(pb::VerifyRequest {
                    header: header(&id, E),
                    stable_ms,
                    timeout_ms,
                }),
                refused(&[Code::InvalidArgument]),
                format!("stable_ms {stable_ms:?} or timeout_ms {timeout_ms} is beyond 24 h"),
            )),
        (0..=300u64, prop_oneof![Just(0u64), 300..=MAX_WAIT_MS]).prop_map(
            |(stable, timeout_ms)| case(
                Call::Verify(pb::VerifyRequest {
                    header: header(SEED, E),
                    stable_ms: Some(stable),
                    timeout_ms,
                }),
                Expect::Answered,
                "the journaled verify again: answered from the journal"
            )
        ),
    ];
    let other = prop_oneof![
        Just(case(Call::Health, Expect::Answered, "health is read-only")),
        Just(case(Call::Watch, Expect::Answered, "watch is read-only")),
        Just(case(
            Call::Fence(pb::FenceRequest { epoch: 0 }),
            refused(&[Code::InvalidArgument]),
            "epoch 0 is no leader's epoch"
        )),
        (1..E).prop_map(|epoch| case(
            Call::Fence(pb::FenceRequest { epoch }),
            refused(&[Code::FailedPrecondition]),
            format!("epoch {epoch} is older than the agent's {E}")
        )),
        Just(case(
            Call::Fence(pb::FenceRequest { epoch: E }),
            Expect::Answered,
            "fencing at the current epoch changes nothing"
        )),
        odd_string()
            .prop_filter("not the journaled id", |s| s != SEED)
            .prop_map(|id| case(
                Call::Status(pb::OperationStatusRequest { operation_id: id }),
                refused(&[Code::NotFound, Code::InvalidArgument]),
                "no such operation in the journal"
            )),
        Just(case(
            Call::Status(pb::OperationStatusRequest {
                operation_id: SEED.into()
            }),
            Expect::Answered,
            "the journaled operation"
        )),
    ];
    (
        prop_oneof![
            3 => drain.boxed(),
            2 => stop.boxed(),
            5 => install.boxed(),
            5 => rollback.boxed(),
            2 => restart.boxed(),
            3 => verify.boxed(),
            3 => other.boxed(),
        ],
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(mut c, as_operator)| {
            if as_operator {
                c.as_operator = true;
                if c.call.writes() {
                    c.expect = refused(&[Code::PermissionDenied]);
                    c.why = format!("the caller has the operator role ({})", c.why);
                }
            }
            c
        })
        .boxed()
}

/// What a call answered.
#[derive(Debug)]
enum Answer {
    Operation(pb::OperationResult),
    Fenced(u64),
    /// Health or Watch.
    Read,
}

/// What must not change: the durable state and what Health reports of it.
#[derive(Debug, PartialEq)]
struct Snapshot {
    epoch_file: Option<String>,
    service_file: Option<String>,
    journal: Option<String>,
    artifacts: Vec<String>,
    version: String,
    state: i32,
    epoch: u64,
    installed_sha256: String,
    previous_version: String,
    last_operation: Option<pb::OperationResult>,
}

/// The agent's durable files (epoch, service record, journal, artifact cache) and its Health.
async fn snapshot(
    state_dir: &std::path::Path,
    client: &AgentClient<Channel>,
) -> anyhow::Result<Snapshot> {
    let read = |name: &str| std::fs::read_to_string(state_dir.join(name)).ok();
    let mut artifacts: Vec<String> = std::fs::read_dir(state_dir.join("artifacts"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    artifacts.sort();
    let h = tokio::time::timeout(CALL_LIMIT, client.clone().health(pb::HealthRequest {}))
        .await
        .map_err(|_| anyhow::anyhow!("health did not answer within {CALL_LIMIT:?}"))??
        .into_inner();
    Ok(Snapshot {
        epoch_file: read("epoch"),
        service_file: read("service.json"),
        journal: read("journal.jsonl"),
        artifacts,
        version: h.installed_version,
        state: h.state,
        epoch: h.epoch,
        installed_sha256: h.installed_sha256,
        previous_version: h.previous_version,
        last_operation: h.last_operation,
    })
}

struct Daemon {
    _tmp: tempfile::TempDir,
    _fe: FrontEnd,
    agent: Mutex<AgentProc>,
    state_dir: PathBuf,
    config: PathBuf,
    coordinator: AgentClient<Channel>,
    operator: AgentClient<Channel>,
    coordinator_channel: Channel,
    baseline: Snapshot,
    /// The first failure that changed the agent's state, with its input.
    spoiled: Spoiled,
}

impl Daemon {
    async fn start() -> anyhow::Result<Daemon> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().to_owned();
        let pki = Pki::new(&root.join("pki"))?;
        let fe = FrontEnd::create(&root, "fe-1", INSTALLED)?;
        fe.start()?;
        let tls = pki.issue(RoleKind::Agent, "fe-1")?;
        let agent = AgentProc::start(&root, "fe-1", "pool-a", "ud-1", &tls, &fe).await?;
        let coordinator_channel =
            rollgate_tests::channel(agent.addr, &pki.issue(RoleKind::Coordinator, "fuzz")?).await?;
        let operator =
            rollgate_tests::agent_client(agent.addr, &pki.issue(RoleKind::Operator, "fuzz")?)
                .await?;
        let mut coordinator = AgentClient::new(coordinator_channel.clone());
        coordinator.fence(pb::FenceRequest { epoch: E }).await?;
        eventually("the service to be serving", Duration::from_secs(20), || {
            let mut c = coordinator.clone();
            async move {
                let h = c.health(pb::HealthRequest {}).await.ok()?.into_inner();
                (h.state == pb::ServiceState::Serving as i32 && !h.busy).then_some(())
            }
        })
        .await?;
        let seed = coordinator
            .verify(pb::VerifyRequest {
                header: header(SEED, E),
                stable_ms: Some(0),
                timeout_ms: 10_000,
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            seed.state == pb::OperationState::Succeeded as i32,
            "the seed verify failed: {}",
            seed.message
        );
        let baseline = snapshot(&agent.state_dir, &coordinator).await?;
        anyhow::ensure!(
            baseline.epoch == E && baseline.version == INSTALLED,
            "unexpected start state: {baseline:?}"
        );
        Ok(Daemon {
            _tmp: tmp,
            _fe: fe,
            state_dir: agent.state_dir.clone(),
            config: agent.config.clone(),
            agent: Mutex::new(agent),
            coordinator,
            operator,
            coordinator_channel,
            baseline,
            spoiled: Spoiled::default(),
        })
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        snapshot(&self.state_dir, &self.coordinator).await
    }

    /// Fails when the agent process has exited, with its log's end.
    fn alive(&self) -> Result<(), TestCaseError> {
        let mut agent = self.agent.lock().map_err(fail)?;
        if let Some(status) = agent.exit_status().map_err(fail)? {
            return Err(fail(format!(
                "the agent exited ({status}):\n{}",
                log_tail(&agent.log())
            )));
        }
        Ok(())
    }

    /// True while the agent runs and its durable state is as it started.
    async fn intact(&self) -> bool {
        if self.alive().is_err() {
            return false;
        }
        match self.snapshot().await {
            Ok(now) => {
                Snapshot {
                    state: self.baseline.state,
                    ..now
                } == self.baseline
            }
            Err(_) => false,
        }
    }

    /// Liveness and "nothing changed", after any call.
    async fn unchanged(&self) -> Result<(), TestCaseError> {
        self.alive()?;
        // The reported service state comes from probes (a TCP connect, an HTTP health check)
        // that a loaded machine can time out once; the durable state may not differ at all.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.snapshot().await.map_err(fail)?;
            let probed_only = Snapshot {
                state: self.baseline.state,
                ..now
            };
            prop_assert_eq!(&probed_only, &self.baseline, "the agent's state changed");
            if now.state == self.baseline.state {
                return Ok(());
            }
            prop_assert!(
                tokio::time::Instant::now() < deadline,
                "the service state changed from {} to {}",
                self.baseline.state,
                now.state
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn send(&self, c: &Case) -> Result<Answer, tonic::Status> {
        let mut client = if c.as_operator {
            self.operator.clone()
        } else {
            self.coordinator.clone()
        };
        let op = |r: tonic::Response<pb::OperationResult>| Answer::Operation(r.into_inner());
        Ok(match c.call.clone() {
            Call::Health => client
                .health(pb::HealthRequest {})
                .await
                .map(|_| Answer::Read)?,
            Call::Watch => {
                let mut s = client.watch(pb::WatchRequest {}).await?.into_inner();
                s.message().await?;
                Answer::Read
            }
            Call::Fence(r) => Answer::Fenced(client.fence(r).await?.into_inner().epoch),
            Call::Drain(r) => op(client.drain(r).await?),
            Call::Stop(r) => op(client.stop(r).await?),
            Call::Install(r) => op(client.install_patch(r).await?),
            Call::Rollback(r) => op(client.rollback(r).await?),
            Call::Restart(r) => op(client.restart(r).await?),
            Call::Verify(r) => op(client.verify(r).await?),
            Call::Status(r) => op(client.operation_status(r).await?),
        })
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
            (Expect::Refused(codes), Err(s)) => {
                check_refusal(&s, codes)?;
                if s.code() != Code::PermissionDenied {
                    // Every refusal of the agent's own carries its typed reason.
                    prop_assert!(
                        pb::AgentErrorDetail::from_status(&s).is_some(),
                        "no AgentErrorDetail in {:?}",
                        s
                    );
                }
            }
            (Expect::Refused(_), Ok(r)) => {
                return Err(fail(format!("accepted, though {}: {r:?}", c.why)));
            }
            (Expect::Answered, Err(s)) => {
                return Err(fail(format!(
                    "refused ({:?}: {}) though it should be answered: {}",
                    s.code(),
                    shown(s.message()),
                    c.why
                )));
            }
            (Expect::Answered, Ok(Answer::Operation(r))) => {
                // Nothing ran now: a replay, or a preparation that journals nothing.
                prop_assert!(r.replayed || r.attempt == 0, "an operation ran: {:?}", r);
                prop_assert_eq!(r.state, pb::OperationState::Succeeded as i32);
            }
            (Expect::Answered, Ok(Answer::Fenced(epoch))) => {
                prop_assert_eq!(epoch, E, "a fence at the current epoch moved it");
            }
            (Expect::Answered, Ok(Answer::Read)) => {}
        }
        self.unchanged().await
    }

    /// Sends raw bytes; judges the answer by what the bytes decode to here.
    async fn check_raw_once(
        &self,
        path: &'static str,
        body: Vec<u8>,
        expect: Raw,
    ) -> Result<(), TestCaseError> {
        let channel = &self.coordinator_channel;
        let send = async {
            if path.ends_with("/Watch") {
                raw_first(channel, path, body).await
            } else {
                raw_unary(channel, path, body).await
            }
        };
        let answer = tokio::time::timeout(CALL_LIMIT, send)
            .await
            .map_err(|_| fail(format!("no answer within {CALL_LIMIT:?} (a hang)")))?;
        match (expect, answer) {
            (Raw::Undecodable, Err(s)) => check_undecodable(&s)?,
            (Raw::Undecodable, Ok(())) => {
                return Err(fail("bytes that do not decode were accepted"));
            }
            (Raw::Like(Expect::Refused(codes)), Err(s)) => check_refusal(&s, &codes)?,
            (Raw::Like(Expect::Refused(_)), Ok(())) => {
                return Err(fail("accepted, though refused without the unknown fields"));
            }
            (Raw::Like(Expect::Answered), Err(s)) => {
                return Err(fail(format!(
                    "refused ({:?}: {}) though answered without the unknown fields",
                    s.code(),
                    shown(s.message())
                )));
            }
            (Raw::Like(Expect::Answered), Ok(())) => {}
            (Raw::Inert, Err(s)) => {
                check_refusal(&s, &ALL_CLEAR)?;
            }
            (Raw::Inert, Ok(())) => {}
        }
        self.unchanged().await
    }
}

/// What raw bytes must get.
#[derive(Debug, Clone)]
enum Raw {
    /// They do not decode as the method's request.
    Undecodable,
    /// They decode to a case's request (plus unknown fields): as that case.
    Like(Expect),
    /// They decode to a request that cannot change anything: any clear answer.
    Inert,
}

/// What `bytes` decode to as `path`'s request, or `None` when the request might act (a valid
/// header at the agent's epoch or above, a higher fence): those are left out, as they may
/// legitimately change state.
fn classify(path: &str, bytes: &[u8]) -> Option<Raw> {
    let acts = |h: Option<pb::OperationHeader>| {
        h.is_some_and(|h| {
            !h.operation_id.is_empty()
                && h.operation_id.len() <= MAX_OPERATION_ID_LEN
                && h.operation_id.chars().all(|c| c.is_ascii_graphic())
                && h.epoch >= E
        })
    };
    let method = path.rsplit('/').next().unwrap_or_default();
    let decoded = match method {
        "Health" => pb::HealthRequest::decode(bytes).map(|_| false),
        "Watch" => pb::WatchRequest::decode(bytes).map(|_| false),
        "Fence" => pb::FenceRequest::decode(bytes).map(|r| r.epoch > E),
        "Drain" => pb::DrainRequest::decode(bytes).map(|r| acts(r.header)),
        "Stop" => pb::StopRequest::decode(bytes).map(|r| acts(r.header)),
        "InstallPatch" => pb::InstallPatchRequest::decode(bytes).map(|r| acts(r.header)),
        "Rollback" => pb::RollbackRequest::decode(bytes).map(|r| acts(r.header)),
        "Restart" => pb::RestartRequest::decode(bytes).map(|r| acts(r.header)),
        "Verify" => pb::VerifyRequest::decode(bytes).map(|r| acts(r.header)),
        _ => pb::OperationStatusRequest::decode(bytes).map(|_| false),
    };
    match decoded {
        Err(_) => Some(Raw::Undecodable),
        Ok(false) => Some(Raw::Inert),
        Ok(true) => None,
    }
}

const PATHS: [&str; 10] = [
    "/rollgate.agent.v1.Agent/Health",
    "/rollgate.agent.v1.Agent/Watch",
    "/rollgate.agent.v1.Agent/Fence",
    "/rollgate.agent.v1.Agent/Drain",
    "/rollgate.agent.v1.Agent/Stop",
    "/rollgate.agent.v1.Agent/InstallPatch",
    "/rollgate.agent.v1.Agent/Rollback",
    "/rollgate.agent.v1.Agent/Restart",
    "/rollgate.agent.v1.Agent/Verify",
    "/rollgate.agent.v1.Agent/OperationStatus",
];

/// Raw inputs: random bytes to any method, a generated case's request spoiled (cut short or
/// with bytes flipped), or intact with unknown fields appended.
fn raw_inputs(
    state_dir: PathBuf,
    config: PathBuf,
) -> BoxedStrategy<(&'static str, Vec<u8>, Option<Raw>)> {
    let garbage = (
        proptest::sample::select(PATHS.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(path, bytes)| {
            let expect = classify(path, &bytes);
            (path, bytes, expect)
        });
    let spoiled = (cases(state_dir.clone(), config.clone()), spoil_how()).prop_map(|(c, how)| {
        let path = c.call.path();
        let bytes = spoil(c.call.encode(), &how);
        let expect = classify(path, &bytes);
        (path, bytes, expect)
    });
    let extended = (cases(state_dir, config), unknown_fields())
        .prop_filter("the coordinator role", |(c, _)| !c.as_operator)
        .prop_map(|(c, extra)| {
            let mut bytes = c.call.encode();
            bytes.extend_from_slice(&extra);
            (c.call.path(), bytes, Some(Raw::Like(c.expect)))
        });
    prop_oneof![2 => garbage, 2 => spoiled, 1 => extended].boxed()
}

/// Cases per run, within the fuzz module's budget of about a minute in a debug build (each costs a Health probe (~25 ms)).
const TYPED_CASES: u32 = 400;
const RAW_CASES: u32 = 200;

#[test]
fn every_agent_rpc_refuses_bad_input_clearly_and_changes_nothing() -> anyhow::Result<()> {
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
    let typed = runner(TYPED_CASES).run(&cases(d.state_dir.clone(), d.config.clone()), |c| {
        rt.block_on(d.check(c))
    });
    report("typed requests", typed, &d.spoiled)?;
    let raw = runner(RAW_CASES).run(
        &raw_inputs(d.state_dir.clone(), d.config.clone()),
        |(path, bytes, expect)| {
            let Some(expect) = expect else {
                return Err(TestCaseError::reject(
                    "these bytes may carry a valid operation",
                ));
            };
            rt.block_on(d.check_raw(path, bytes, expect))
        },
    );
    report("raw bytes", raw, &d.spoiled)?;
    eprintln!(
        "agent fuzz: {} cases in {:.1?}",
        TYPED_CASES + RAW_CASES,
        t0.elapsed()
    );
    Ok(())
}

/// Inputs the fuzzing found mishandled, cut down by hand to what matters, kept as named cases
/// (run first, every time). A call that changed state is last: it spoils the ones after it.
fn regressions() -> Vec<(&'static str, Case)> {
    let fresh = |id: &str| header(id, E);
    let install = |artifact: &str| {
        Call::Install(pb::InstallPatchRequest {
            header: fresh("regression/install"),
            artifact: artifact.into(),
            sha256: "a".repeat(64),
            version: "2.0".into(),
            timeout_ms: 0,
            prepare_only: true,
        })
    };
    let invalid = refused(&[Code::InvalidArgument]);
    vec![
        (
            "a 10 KiB id of NULs: the escaped echo outgrew HTTP/2's 16 KiB of headers (INTERNAL)",
            case(
                Call::Stop(pb::StopRequest {
                    header: header(&"\0".repeat(10 * 1024), 1),
                }),
                invalid.clone(),
                "a bad operation id",
            ),
        ),
        (
            "a 10 KiB unknown id echoed whole in NOT_FOUND",
            case(
                Call::Status(pb::OperationStatusRequest {
                    operation_id: "y".repeat(10 * 1024),
                }),
                refused(&[Code::NotFound]),
                "no such operation",
            ),
        ),
        (
            "an unknown id with a newline: a NOT_FOUND over two lines",
            case(
                Call::Status(pb::OperationStatusRequest {
                    operation_id: "a\nb".into(),
                }),
                refused(&[Code::NotFound]),
                "no such operation",
            ),
        ),
        (
            "a directory as the artifact: INTERNAL (is a directory)",
            case(install("/"), invalid.clone(), "not a file"),
        ),
        (
            "a NUL in the artifact path: INTERNAL",
            case(install("/nonexistent/a\0b"), invalid.clone(), "not a path"),
        ),
        (
            "a file name too long in the artifact path: INTERNAL",
            case(
                install(&format!("/{}", "y".repeat(300))),
                invalid.clone(),
                "not a path",
            ),
        ),
        (
            "a newline in a missing artifact path: a NOT_FOUND over two lines",
            case(
                install("/nonexistent/a\nb"),
                refused(&[Code::InvalidArgument, Code::NotFound]),
                "not a path",
            ),
        ),
        (
            "a URL without a host: UNAVAILABLE, as if a retry could help",
            case(install("http://"), invalid.clone(), "not a URL"),
        ),
        (
            "a from_version that is no version: answered as a rollback with nothing to do",
            case(
                Call::Rollback(pb::RollbackRequest {
                    header: fresh("regression/rollback"),
                    from_version: "x".repeat(129),
                    prepare_only: true,
                    ..Default::default()
                }),
                invalid.clone(),
                "not a version",
            ),
        ),
        (
            "stable_ms and timeout_ms of u64::MAX: a verify that runs for 584 million years, \
             the agent busy (refusing every other operation) until restarted",
            case(
                Call::Verify(pb::VerifyRequest {
                    header: fresh("regression/verify"),
                    stable_ms: Some(u64::MAX),
                    timeout_ms: u64::MAX,
                }),
                invalid,
                "beyond 24 h",
            ),
        ),
    ]
}
