//! What the gRPC fuzzers share: odd values, the refusal check, a runner, and a client that sends
//! raw bytes to a method (so that the daemons also see messages no generated client would send).

use bytes::{Buf, BufMut};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A call that has not answered by then counts as a hang. Generous: a loaded 2-core machine
/// with a debug build, and the slowest refusal (a connection refused on loopback) is instant.
pub const CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A refusal a person can read: one line, and not a copy of a 10 KB input. Also what keeps the
/// status inside the 16 KiB of headers an HTTP/2 client accepts.
pub const MAX_MESSAGE: usize = 1024;

/// The bound every duration of a step has (the coordinator's plan bound, also the agent's).
pub const MAX_WAIT_MS: u64 = 24 * 3600 * 1000;

/// A runner for `cases` cases; no persistence file (the regressions are written out as named
/// cases in the tests instead), and a bounded shrink so that a failure reports in seconds.
pub fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    })
}

/// Turns any error into a failed case.
pub fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The agent's rule for versions (InstallPatchRequest.version): 1-128 printable ASCII
/// characters without spaces. A plan that breaks it can never be installed.
pub fn version_ok(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic())
}

/// A sha256 as both daemons accept it: 64 hex digits once trimmed.
pub fn digest_ok(s: &str) -> bool {
    let t = s.trim();
    t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Strings that break parsers, paths, keys, logs and headers: empty, huge, NUL, newlines,
/// path traversal, strings shaped like etcd keys and operation ids, unicode, control characters.
pub fn odd_string() -> BoxedStrategy<String> {
    let fixed: Vec<String> = [
        "",
        " ",
        "/",
        ".",
        "..",
        "../../etc/passwd",
        "a/../../b",
        "\0",
        "a\0b",
        "line\nbreak",
        "\r\n",
        "\t",
        "\u{7f}",
        "\u{1b}[31mred\u{1b}[0m",
        "é",
        "日本語",
        "\u{202e}gnp.exe",
        "🦀",
        "\u{feff}bom",
        "%00",
        "%2e%2e%2f",
        "election/1",
        "/rollgate/test/election/1",
        "upgrade/pool-a",
        "/rollgate/test/upgrade/pool-a",
        "events/pool-a/00000000000000000001",
        "pool-a\0",
        "pool-a/",
        " pool-a",
        "pool-a\n",
        "POOL-A",
        "setup/fe-1/stop",
        "pool-a-1700000000000/fe-1/drain/1",
        "-1",
        "18446744073709551615",
        "NaN",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "x".repeat(129),
        "y".repeat(10 * 1024),
        "\0".repeat(10 * 1024),
        "\n".repeat(1024),
        "é".repeat(5 * 1024),
        "\u{1}".repeat(4 * 1024),
    ])
    .collect();
    prop_oneof![
        4 => proptest::sample::select(fixed),
        1 => "[ -~]{0,64}",
        1 => "\\PC{0,64}",
        1 => "[\\x00-\\x1f\\x7f]{1,16}",
        1 => any::<String>(),
    ]
    .boxed()
}

/// A character a name or version may not contain: not printable ASCII, or a space.
pub fn bad_char() -> BoxedStrategy<char> {
    prop_oneof![
        proptest::sample::select(vec![
            ' ', '\0', '\n', '\r', '\t', '\u{7f}', '\u{1b}', 'é', '日', '🦀', '\u{202e}',
            '\u{feff}',
        ]),
        any::<char>().prop_filter("not printable ASCII", |c| !c.is_ascii_graphic()),
    ]
    .boxed()
}

/// A string that breaks [`version_ok`], with why.
pub fn bad_version() -> BoxedStrategy<(String, &'static str)> {
    prop_oneof![
        Just((String::new(), "an empty version")),
        prop_oneof![
            Just("x".repeat(129)),
            "[!-~]{129,400}",
            Just("v".repeat(10 * 1024))
        ]
        .prop_map(|v| (v, "a version over 128 characters")),
        ("[!-~]{0,12}", bad_char(), "[!-~]{0,12}").prop_map(|(a, c, b)| (
            format!("{a}{c}{b}"),
            "a version with a space, a control character or non-ASCII"
        )),
    ]
    .boxed()
}

/// A string that is not a sha256, with why (checked: it really is not one).
pub fn bad_digest() -> BoxedStrategy<String> {
    prop_oneof![
        odd_string(),
        "[0-9a-f]{0,63}",
        "[0-9a-f]{65,80}",
        "[0-9a-f]{63}[g-z]",
        Just(format!("{}\0", "a".repeat(63))),
    ]
    .prop_filter("not 64 hex digits", |s| !digest_ok(s))
    .boxed()
}

/// u64 values that break arithmetic: 0, 1, the largest, negative numbers seen as unsigned.
pub fn edge_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        proptest::sample::select(vec![
            0,
            1,
            u64::MAX,
            u64::MAX - 1,
            i64::MAX as u64,
            i64::MIN as u64,
            u64::from(u32::MAX),
            MAX_WAIT_MS,
            MAX_WAIT_MS + 1,
        ]),
        any::<u64>(),
    ]
    .boxed()
}

/// An enum's wire value that no version of the contract defines (negative, or past the end).
pub fn unknown_enum(known: i32) -> BoxedStrategy<i32> {
    prop_oneof![
        proptest::sample::select(vec![-1, i32::MIN, i32::MAX, known + 1]),
        i32::MIN..0,
        (known + 1)..i32::MAX,
    ]
    .boxed()
}

/// Every code that names a cause (none of the catch-alls).
pub const ALL_CLEAR: [Code; 10] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unavailable,
    Code::Unauthenticated,
    Code::ResourceExhausted,
];

/// Checks a refusal: an expected code, never the catch-alls INTERNAL or UNKNOWN, and a message
/// that says what was wrong in one readable line.
pub fn check_refusal(s: &Status, allowed: &[Code]) -> Result<(), TestCaseError> {
    prop_assert!(
        !matches!(s.code(), Code::Internal | Code::Unknown | Code::Ok),
        "a catch-all code for bad input: {:?}: {}",
        s.code(),
        shown(s.message())
    );
    prop_assert!(
        allowed.contains(&s.code()),
        "code {:?} ({}), expected one of {allowed:?}",
        s.code(),
        shown(s.message())
    );
    let m = s.message();
    prop_assert!(!m.trim().is_empty(), "empty message with {:?}", s.code());
    prop_assert!(
        !m.contains('\n') && !m.contains('\r'),
        "a message over several lines: {}",
        shown(m)
    );
    prop_assert!(
        m.len() <= MAX_MESSAGE,
        "a message of {} bytes: {}",
        m.len(),
        shown(m)
    );
    Ok(())
}

/// At most 300 characters of `s`, escaped, for failure messages.
pub fn shown(s: &str) -> String {
    let head: String = s.chars().take(300).collect();
    if head.len() < s.len() {
        format!("{head:?}... ({} bytes)", s.len())
    } else {
        format!("{head:?}")
    }
}

/// A field number no version of the contract uses, with a value of each wire type, appended to
/// an encoded message: a receiver must skip it and see the same message.
pub fn unknown_fields() -> BoxedStrategy<Vec<u8>> {
    let field = (
        1000u32..(1 << 29),
        0u8..4,
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(number, kind, n, bytes)| {
            let mut out = Vec::new();
            let wire_type = [0u64, 1, 2, 5][usize::from(kind)];
            varint(u64::from(number) << 3 | wire_type, &mut out);
            match wire_type {
                0 => varint(n, &mut out),
                1 => out.extend_from_slice(&n.to_le_bytes()),
                2 => {
                    varint(bytes.len() as u64, &mut out);
                    out.extend_from_slice(&bytes);
                }
                _ => out.extend_from_slice(&(n as u32).to_le_bytes()),
            }
            out
        });
    proptest::collection::vec(field, 1..4)
        .prop_map(|fields| fields.concat())
        .boxed()
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// How an encoded message is spoiled for the raw-bytes property.
#[derive(Debug, Clone)]
pub enum Spoil {
    /// Cut at this fraction of its length.
    Truncate(u16),
    /// XOR these bytes at these positions (modulo the length).
    Flip(Vec<(u16, u8)>),
}

/// Spoils `bytes` as `how` says.
pub fn spoil(mut bytes: Vec<u8>, how: &Spoil) -> Vec<u8> {
    match how {
        Spoil::Truncate(at) => {
            let keep = bytes.len() * usize::from(*at) / usize::from(u16::MAX);
            bytes.truncate(keep);
        }
        Spoil::Flip(flips) => {
            if !bytes.is_empty() {
                let n = bytes.len();
                for (at, x) in flips {
                    bytes[usize::from(*at) % n] ^= x | 1;
                }
            }
        }
    }
    bytes
}

/// Spoil strategies.
pub fn spoil_how() -> BoxedStrategy<Spoil> {
    prop_oneof![
        any::<u16>().prop_map(Spoil::Truncate),
        proptest::collection::vec((any::<u16>(), any::<u8>()), 1..4).prop_map(Spoil::Flip),
    ]
    .boxed()
}

/// A codec that sends and receives message bodies as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends `body` as the request of unary method `path` (e.g. `/rollgate.agent.v1.Agent/Drain`).
pub async fn raw_unary(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    grpc.unary::<_, Vec<u8>, _>(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|_| ())
}

/// Sends `body` to server-streaming method `path` and waits for its first message (the streams
/// fuzzed here never end on their own while the daemon runs).
pub async fn raw_first(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let mut stream = grpc
        .server_streaming::<_, Vec<u8>, _>(
            tonic::Request::new(body),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .map(|_| ())
        .ok_or_else(|| Status::unknown("the stream ended before its first message"))
}

/// The status of undecodable bytes, as tonic answers it (the gRPC convention: a request that
/// does not parse is INTERNAL). Checked so that the message still names the cause in one line.
pub fn check_undecodable(s: &Status) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.code(), Code::Internal, "{}", shown(s.message()));
    prop_assert!(
        s.message().contains("decode") && !s.message().contains('\n'),
        "{}",
        shown(s.message())
    );
    Ok(())
}

/// The first failing case that changed a daemon's state (or killed it). Such a case spoils
/// every case after it, so the shrinker would "minimise" it to whatever runs next: it is kept
/// as it was generated, and later cases pass without running.
#[derive(Debug, Default)]
pub struct Spoiled(std::sync::Mutex<Option<String>>);

impl Spoiled {
    /// Runs `case` (described by `input`) unless an earlier case spoiled the daemon; a failure
    /// after which `intact` says the daemon changed is kept.
    pub async fn guarded<F>(
        &self,
        input: String,
        case: impl std::future::Future<Output = Result<(), TestCaseError>>,
        intact: impl FnOnce() -> F,
    ) -> Result<(), TestCaseError>
    where
        F: std::future::Future<Output = bool>,
    {
        if self.0.lock().map_err(fail)?.is_some() {
            return Ok(());
        }
        let result = case.await;
        if let Err(e) = &result {
            if !intact().await {
                *self.0.lock().map_err(fail)? = Some(format!("{e}\ninput: {input}"));
            }
        }
        result
    }

    /// The kept failure, if any (taken: reported once).
    pub fn take(&self) -> anyhow::Result<Option<String>> {
        Ok(self.0.lock().map_err(|e| anyhow::anyhow!("{e}"))?.take())
    }
}

/// Turns a run's result into the test's: the first failure that changed the daemon's state
/// (`spoiled`) as generated, or else the shrunk failure.
pub fn report<T: std::fmt::Debug>(
    what: &str,
    result: Result<(), TestError<T>>,
    spoiled: &Spoiled,
) -> anyhow::Result<()> {
    if let Some(first) = spoiled.take()? {
        anyhow::bail!("{what}: a call changed the daemon's state: {first}");
    }
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(why, input)) => {
            anyhow::bail!("{what}: {why}\nminimal failing input: {input:#?}")
        }
        Err(TestError::Abort(why)) => anyhow::bail!("{what}: aborted: {why}"),
    }
}

/// The last lines of a daemon's log, for a failure message.
pub fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
