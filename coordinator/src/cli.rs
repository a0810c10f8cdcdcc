//! The `rollgate` operator CLI, kubectl/etcdctl style: subcommands, `--output table|json`,
//! exit 0 on success, otherwise one clear line on stderr and a non-zero code. It finds the
//! leader itself: give it any coordinator, and it follows a follower's pointer to the leader.
//!
//! `upgrade watch` and `upgrade start --watch` end with a code a script can branch on:
//! [`EXIT_COMPLETED`], [`EXIT_ENDED_BADLY`], [`EXIT_NEEDS_OPERATOR`], [`EXIT_TIMED_OUT`].

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rollgate_common::pki::Ca;
use rollgate_common::tls::{Role, RoleKind, TlsFiles};
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::operator_client::OperatorClient;
use rollgate_proto::operator::{names, retry_after, LEADER_HEADER};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Watch: the upgrade completed.
pub const EXIT_COMPLETED: i32 = 0;
/// Watch: the upgrade failed, was aborted or rolled back (and any other error).
pub const EXIT_ENDED_BADLY: i32 = 1;
/// Watch: the upgrade is paused and waits for an operator (resume, abort or rollback).
pub const EXIT_NEEDS_OPERATOR: i32 = 2;
/// Watch: `--timeout` passed while the upgrade still ran (it goes on).
pub const EXIT_TIMED_OUT: i32 = 3;

const EXIT_CODES: &str =
    "Exit codes of `upgrade watch`, `rollout watch` and their `start --watch`: \
0 completed; 1 failed, aborted or rolled back (and any error); 2 paused, waiting for an operator; \
3 --timeout passed while it still runs. Other commands: 0 done, 1 error.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "rollgate",
    version,
    about = "operate rollgate: readiness, rolling upgrades, failover, history",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Coordinator addresses (host:port), comma-separated; any one will do.
    #[arg(
        long,
        env = "ROLLGATE_COORDINATOR",
        value_delimiter = ',',
        global = true,
        default_value = "127.0.0.1:7100"
    )]
    pub coordinator: Vec<String>,
    /// CA certificate (PEM).
    #[arg(long, env = "ROLLGATE_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Operator certificate (PEM), carrying rollgate://operator/<name>.
    #[arg(long, env = "ROLLGATE_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Operator key (PEM).
    #[arg(long, env = "ROLLGATE_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Talk without TLS (only to a coordinator running in insecure demo mode).
    #[arg(long, env = "ROLLGATE_INSECURE", global = true)]
    pub insecure: bool,
    /// Output for people (table) or programs (json).
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text.
    Table,
    /// JSON (one document, or one per line for streams).
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Is the pool ready for an upgrade? (Get-CsPoolUpgradeReadinessState)
    Readiness {
        /// The pool.
        #[arg(long)]
        pool: String,
    },
    /// Every pool and server (listed in the config or joined by themselves): state, version,
    /// and who is lost.
    #[command(visible_alias = "fleet")]
    Inventory,
    /// Rolling upgrades.
    #[command(subcommand)]
    Upgrade(UpgradeCmd),
    /// Fleet-wide roll-outs: many pools, by name or label, a few at a time.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Pool failover to its paired backup pool, and back.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// The durable history of upgrade steps.
    Events {
        /// The pool.
        #[arg(long)]
        pool: String,
        /// At most N events (the newest, or the oldest after --after); at most 1000.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only events older than this sequence number (to page back).
        #[arg(long, conflicts_with = "after")]
        before: Option<u64>,
        /// Only events newer than this sequence number (to follow forward).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Who leads, at which epoch.
    Leader,
    /// Make the deployment's CA and role certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a shell completion script (e.g. `rollgate completions bash >
    /// /etc/bash_completion.d/rollgate`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `rollgate man > /usr/local/share/man/man1/rollgate.1`;
    /// with --dir, write one page per command there (rollgate.1, rollgate-upgrade-start.1, ...).
    Man {
        /// Write every page into this directory instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `rollgate upgrade ...`
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum UpgradeCmd {
    /// Start a rolling upgrade (or print the plan with --dry-run).
    Start(StartArgs),
    /// The upgrade's status now.
    Status(PoolArg),
    /// Live progress until the upgrade completes (0), ends otherwise (1), pauses (2), or
    /// --timeout passes (3).
    Watch(WatchArgs),
    /// Launch no new servers; those in flight finish.
    Pause(PoolArg),
    /// Go on after a pause.
    Resume(PoolArg),
    /// Stop the upgrade; servers in flight finish their step chain.
    Abort(PoolArg),
    /// Reinstall the previous version on every server this upgrade touched.
    Rollback(PoolArg),
    /// Past plans of the pool: who, when, version, outcome, duration.
    History {
        /// The pool.
        #[arg(long)]
        pool: String,
        /// The newest N plans (at most 100).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: u32,
    },
}

/// `rollgate pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Fail the pool over to its paired pool (runs the configured hook).
    Failover(PoolArg),
    /// Fail it back.
    Failback(PoolArg),
}

/// `rollgate certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a CA (ca.crt, ca.key) in DIR.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "rollgate CA")]
        name: String,
    },
    /// Issue a role certificate from the CA in DIR: <role>-<name>.crt/.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// agent, coordinator or operator.
        #[arg(long)]
        role: String,
        /// Server id, coordinator id or operator name.
        #[arg(long)]
        name: String,
        /// DNS names or IPs the holder serves on (repeatable).
        #[arg(long)]
        host: Vec<String>,
    },
}

/// A pool name.
#[derive(Debug, Args)]
pub struct PoolArg {
    /// The pool.
    #[arg(long)]
    pub pool: String,
}

/// `rollgate upgrade watch` arguments.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The pool.
    #[arg(long)]
    pub pool: String,
    /// Stop watching after this long (exit 3; the upgrade goes on) [no limit].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// `rollgate upgrade start` arguments. An option left out takes the coordinator's default
/// (shown in brackets); an explicit value, zero included, is used as given.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The pool.
    #[arg(long)]
    pub pool: String,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Print the plan (domains, servers, order, policies) and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// After starting, watch until the upgrade completes (0), ends otherwise (1), pauses (2)
    /// or --timeout passes (3).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop watching after this long (exit 3; the upgrade goes on).
    #[arg(long, requires = "watch", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// What a pool's plan is made of: the version, its artifact and the policies. An option
/// left out takes the coordinator's default (shown in brackets).
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The target version.
    #[arg(long)]
    pub version: String,
    /// Artifact path or file://, http(s):// URL, as each agent sees it.
    #[arg(long)]
    pub artifact: String,
    /// sha256 of the artifact (mandatory; agents check it before anything goes down).
    #[arg(long)]
    pub sha256: String,
    /// How servers stop taking traffic [graceful].
    #[arg(long, value_enum)]
    pub drain: Option<DrainArg>,
    /// How long a graceful drain waits for connections [5m; at most 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Servers of one domain out of service at once [1].
    #[arg(long)]
    pub parallelism: Option<u32>,
    /// How long a server must stay good after restart [5s; 0s: one good probe].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub verify_stable: Option<Duration>,
    /// How long verify may try [2m; at most 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub verify_timeout: Option<Duration>,
    /// Wait between Busy answers [10m; at most 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub busy_retry_interval: Option<Duration>,
    /// Busy answers before the pool counts as in trouble [3; at most 100].
    #[arg(long)]
    pub busy_retries: Option<u32>,
    /// When Busy persists or active servers are insufficient [failover when the pool has a
    /// paired pool, else pause].
    #[arg(long, value_enum)]
    pub on_busy: Option<ExhaustedArg>,
    /// Extra attempts for a failed server step [1; at most 20].
    #[arg(long)]
    pub server_retries: Option<u32>,
    /// When a server still fails [pause].
    #[arg(long, value_enum)]
    pub on_failure: Option<FailureArg>,
    /// Domain order, comma-separated [the configured order].
    #[arg(long, value_delimiter = ',')]
    pub domain_order: Vec<String>,
    /// Soak the first domain this long before the next (canary) [none; at most 7d].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub canary_soak: Option<Duration>,
    /// The artifact of the version the servers run now, for servers whose version was
    /// installed outside rollgate: what a rollback installs on them.
    #[arg(long, requires = "rollback_sha256")]
    pub rollback_artifact: Option<String>,
    /// sha256 of --rollback-artifact.
    #[arg(long, requires = "rollback_artifact")]
    pub rollback_sha256: Option<String>,
}

/// `rollgate rollout start` arguments.
#[derive(Debug, Args)]
pub struct RolloutStartArgs {
    /// Pools by name, comma-separated, in the order to start them.
    #[arg(long, value_delimiter = ',', required_unless_present = "selector")]
    pub pools: Vec<String>,
    /// Every pool carrying these labels: key=value[,key=value].
    #[arg(long, conflicts_with = "pools")]
    pub selector: Option<String>,
    /// One of the pools, upgraded first and alone; the others start once it completed.
    #[arg(long)]
    pub canary: Option<String>,
    /// Pools upgrading at once [1]. A pool never runs together with its paired pool.
    #[arg(long)]
    pub max_in_flight: Option<u32>,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Resolve every pool's plan and show the roll-out; start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// After starting, watch until the roll-out completes (0), ends otherwise (1), pauses
    /// (2) or --timeout passes (3).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: stop watching after this long (exit 3; the roll-out goes on).
    #[arg(long, requires = "watch", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// A roll-out id.
#[derive(Debug, Args)]
pub struct RolloutArg {
    /// The roll-out [the newest].
    #[arg(long)]
    pub id: Option<String>,
}

/// `rollgate rollout watch` arguments.
#[derive(Debug, Args)]
pub struct RolloutWatchArgs {
    /// The roll-out [the newest].
    #[arg(long)]
    pub id: Option<String>,
    /// Stop watching after this long (exit 3; the roll-out goes on) [no limit].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// `rollgate rollout ...`
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum RolloutCmd {
    /// Upgrade many pools (by name or label) to one version, a few at a time.
    Start(RolloutStartArgs),
    /// The roll-out's status now: each pool's stage.
    Status(RolloutArg),
    /// Live progress until the roll-out completes (0), ends otherwise (1), pauses (2), or
    /// --timeout passes (3).
    Watch(RolloutWatchArgs),
    /// Start no new pool; pause the pools in flight.
    Pause(RolloutArg),
    /// Resume the paused pools and go on (a failed pool stays failed).
    Resume(RolloutArg),
    /// Skip the pools not started; abort the pools in flight.
    Abort(RolloutArg),
}

/// `--drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DrainArg {
    /// Stop new connections and let open ones finish.
    Graceful,
    /// A declared outage: stop at once.
    Immediate,
}

/// `--on-busy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExhaustedArg {
    Failover,
    Pause,
    Abort,
}

/// `--on-failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailureArg {
    Pause,
    Rollback,
}

/// Milliseconds for the wire; a duration too long for it is sent as the largest value, which
/// the coordinator refuses with the field's bound.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wire request for `a`.
pub fn start_request(a: &StartArgs) -> pb::StartUpgradeRequest {
    pb::StartUpgradeRequest {
        pool: a.pool.clone(),
        dry_run: a.dry_run,
        ..plan_request(&a.plan)
    }
}

/// The wire roll-out request for `a`.
pub fn rollout_request(a: &RolloutStartArgs) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        pools: a.pools.clone(),
        selector: a.selector.clone().unwrap_or_default(),
        canary: a.canary.clone().unwrap_or_default(),
        max_in_flight: a.max_in_flight,
        upgrade: Some(plan_request(&a.plan)),
        dry_run: a.dry_run,
    }
}

/// The plan part of a start request (no pool).
fn plan_request(a: &PlanArgs) -> pb::StartUpgradeRequest {
    pb::StartUpgradeRequest {
        pool: String::new(),
        version: a.version.clone(),
        artifact: a.artifact.clone(),
        sha256: a.sha256.clone(),
        drain: match a.drain {
            None => pb::DrainMode::Unspecified,
            Some(DrainArg::Graceful) => pb::DrainMode::Graceful,
            Some(DrainArg::Immediate) => pb::DrainMode::Immediate,
        } as i32,
        drain_timeout_ms: a.drain_timeout.map(ms),
        parallelism: a.parallelism,
        verify_stable_ms: a.verify_stable.map(ms),
        verify_timeout_ms: a.verify_timeout.map(ms),
        busy_retry_interval_ms: a.busy_retry_interval.map(ms),
        busy_retries: a.busy_retries,
        on_exhausted: match a.on_busy {
            None => pb::ExhaustedAction::Unspecified,
            Some(ExhaustedArg::Failover) => pb::ExhaustedAction::Failover,
            Some(ExhaustedArg::Pause) => pb::ExhaustedAction::Pause,
            Some(ExhaustedArg::Abort) => pb::ExhaustedAction::Abort,
        } as i32,
        server_retries: a.server_retries,
        on_failure: match a.on_failure {
            None => pb::FailureAction::Unspecified,
            Some(FailureArg::Pause) => pb::FailureAction::Pause,
            Some(FailureArg::Rollback) => pb::FailureAction::Rollback,
        } as i32,
        domain_order: a.domain_order.clone(),
        canary_soak_ms: a.canary_soak.map(ms),
        dry_run: false,
        rollback_artifact: a.rollback_artifact.clone().unwrap_or_default(),
        rollback_sha256: a.rollback_sha256.clone().unwrap_or_default(),
    }
}

/// Connection settings.
struct Conn {
    addrs: Vec<String>,
    tls: Option<TlsFiles>,
}

impl Conn {
    async fn client(&self, addr: &str) -> anyhow::Result<OperatorClient<Channel>> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(3));
        if let Some(t) = &self.tls {
            ep = ep.tls_config(t.client_config()?)?;
        }
        let ch = ep
            .connect()
            .await
            .with_context(|| format!("cannot reach coordinator {addr}"))?;
        Ok(OperatorClient::new(ch).max_decoding_message_size(16 << 20))
    }

    /// Calls `f` on the first reachable coordinator, following a follower to the leader.
    /// While no coordinator can answer yet (a leader taking over, an election under way, a
    /// leader that just went away), it waits as told (`rollgate-retry-after-ms`) and retries,
    /// for up to [`RETRY_FOR`].
    async fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(OperatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let give_up = tokio::time::Instant::now() + RETRY_FOR;
        let mut said = String::new();
        loop {
            let (err, wait) = match self.call_once(&f).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(wait) = wait else {
                return Err(err);
            };
            if tokio::time::Instant::now() + wait > give_up {
                return Err(err.context(format!(
                    "no coordinator could answer within {}",
                    humantime::format_duration(RETRY_FOR)
                )));
            }
            let line = format!("{err:#}; retrying");
            if line != said {
                eprintln!("{line}");
                said = line;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One pass over the addresses. The error comes with how long to wait before another pass
    /// when it is worth one.
    async fn call_once<T, F, Fut>(&self, f: &F) -> Result<T, (anyhow::Error, Option<Duration>)>
    where
        F: Fn(OperatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = (anyhow!("no coordinator address given"), None);
        for addr in &self.addrs {
            let c = match self.client(addr).await {
                Ok(c) => c,
                Err(e) => {
                    last = (e, Some(Duration::from_millis(500)));
                    continue;
                }
            };
            let s = match f(c).await {
                Ok(v) => return Ok(v),
                Err(s) => s,
            };
            let leader = s
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match (s.code(), leader) {
                (tonic::Code::FailedPrecondition, Some(leader)) => {
                    let c = self
                        .client(&leader)
                        .await
                        .map_err(|e| (e, Some(Duration::from_millis(500))))?;
                    return match f(c).await {
                        Ok(v) => Ok(v),
                        Err(s) => Err(retryable(s)),
                    };
                }
                (tonic::Code::Unavailable, _) => last = retryable(s),
                _ => return Err((status_error(s), None)),
            }
        }
        Err(last)
    }
}

/// How long the CLI keeps retrying while no coordinator can answer.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// The error, and the wait before retrying when the status says the call may succeed later.
fn retryable(s: tonic::Status) -> (anyhow::Error, Option<Duration>) {
    let hinted = retry_after(&s);
    let wait = match s.code() {
        tonic::Code::Unavailable => Some(
            hinted
                .unwrap_or(Duration::from_millis(500))
                .min(Duration::from_secs(5)),
        ),
        _ => None,
    };
    (status_error(s), wait)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let m = s.message();
    if m.is_empty() {
        anyhow!("{:?}", s.code())
    } else {
        anyhow!("{m}")
    }
}

/// Runs the CLI; the error is printed as one line by the binary.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Cmd::Certs(c) => return certs(c, cli.output).map(|()| 0),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "rollgate", &mut text);
            return print_bytes(&text).map(|()| 0);
        }
        Cmd::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            if let Some(dir) = dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let written = write_man_pages(cmd, dir, "rollgate")?;
                println!("wrote {written} manual pages in {}", dir.display());
                return Ok(0);
            }
            let mut text = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut text)?;
            return print_bytes(&text).map(|()| 0);
        }
        _ => {}
    }
    let tls = match (&cli.ca, &cli.cert, &cli.key, cli.insecure) {
        (_, _, _, true) => None,
        (Some(ca), Some(cert), Some(key), false) => Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() }),
        _ => bail!("mTLS needs --ca, --cert and --key (or ROLLGATE_CA/CERT/KEY); use --insecure only with a demo coordinator"),
    };
    let conn = Conn {
        addrs: cli.coordinator.clone(),
        tls,
    };
    let out = cli.output;
    match cli.command {
        Cmd::Readiness { pool } => {
            let r = conn
                .call(|mut c| {
                    let pool = pool.clone();
                    async move {
                        c.readiness(pb::PoolRequest { pool })
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await?;
            print_readiness(&[r], out);
            Ok(0)
        }
        Cmd::Inventory => {
            let r = conn
                .call(|mut c| async move {
                    c.inventory(pb::InventoryRequest {})
                        .await
                        .map(|r| r.into_inner())
                })
                .await?;
            print_readiness(&r.pools, out);
            Ok(0)
        }
        Cmd::Leader => {
            let r = conn
                .call(|mut c| async move {
                    c.leader(pb::LeaderRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"id": r.id, "address": r.address, "epoch": r.epoch})
                ),
                Output::Table if r.id.is_empty() => println!("no leader elected"),
                Output::Table => println!("leader {} at {} (epoch {})", r.id, r.address, r.epoch),
            }
            Ok(0)
        }
        Cmd::Events {
            pool,
            limit,
            before,
            after,
        } => {
            let r = conn
                .call(|mut c| {
                    let pool = pool.clone();
                    async move {
                        c.events(pb::EventsRequest {
                            pool,
                            limit,
                            after_seq: after,
                            before_seq: before,
                        })
                        .await
                        .map(|r| r.into_inner())
                    }
                })
                .await?;
            for e in &r.events {
                match out {
                    Output::Json => println!("{}", event_json(e)),
                    Output::Table => println!(
                        "{:>5} {} e{} {:<18} {:<8} {:<8} {}",
                        e.seq,
                        fmt_time(e.at_ms),
                        e.epoch,
                        e.kind,
                        e.domain,
                        e.server,
                        e.message
                    ),
                }
            }
            if r.more && out == Output::Table {
                // Where the next page starts, on stderr so that scripts reading stdout see events only.
                let hint = match (after, r.events.first(), r.events.last()) {
                    (Some(_), _, Some(last)) => format!("--after {}", last.seq),
                    (None, Some(first), _) => format!("--before {}", first.seq),
                    _ => String::new(),
                };
                eprintln!("more events: rollgate events --pool {pool} {hint}");
            }
            Ok(0)
        }
        Cmd::Pool(p) => {
            let (pool, over) = match p {
                PoolCmd::Failover(a) => (a.pool, true),
                PoolCmd::Failback(a) => (a.pool, false),
            };
            let r = conn
                .call(|mut c| {
                    let pool = pool.clone();
                    async move {
                        let req = pb::PoolRequest { pool };
                        if over {
                            c.failover(req).await
                        } else {
                            c.failback(req).await
                        }
                        .map(|r| r.into_inner())
                    }
                })
                .await?;
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"pool": r.pool, "failed_over": r.failed_over, "message": r.message})
                ),
                Output::Table => println!("{}", r.message),
            }
            Ok(0)
        }
        Cmd::Upgrade(u) => upgrade(&conn, u, out).await,
        Cmd::Rollout(r) => rollout(&conn, r, out).await,
        Cmd::Certs(_) | Cmd::Completions { .. } | Cmd::Man { .. } => Ok(0),
    }
}

async fn upgrade(conn: &Conn, u: UpgradeCmd, out: Output) -> anyhow::Result<i32> {
    type Op = fn(
        OperatorClient<Channel>,
        pb::PoolRequest,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<pb::UpgradeStatus, tonic::Status>> + Send>,
    >;
    let simple = |pool: String, op: Op| async move {
        conn.call(|c| op(c, pb::PoolRequest { pool: pool.clone() }))
            .await
    };
    let s = match u {
        UpgradeCmd::Start(a) => {
            let req = start_request(&a);
            let s = conn
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.start_upgrade(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            if a.dry_run {
                print_plan(&s, out);
                return Ok(0);
            }
            print_status(&s, out);
            if a.watch {
                return watch(conn, &a.pool, out, a.timeout).await;
            }
            s
        }
        UpgradeCmd::Status(p) => {
            simple(p.pool, |mut c, r| {
                Box::pin(async move { c.get_upgrade(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        UpgradeCmd::Watch(w) => return watch(conn, &w.pool, out, w.timeout).await,
        UpgradeCmd::History { pool, limit } => {
            let r = conn
                .call(|mut c| {
                    let pool = pool.clone();
                    async move {
                        c.history(pb::HistoryRequest { pool, limit })
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await?;
            print_history(&pool, &r.plans, out);
            return Ok(0);
        }
        UpgradeCmd::Pause(p) => {
            simple(p.pool, |mut c, r| {
                Box::pin(async move { c.pause_upgrade(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        UpgradeCmd::Resume(p) => {
            simple(p.pool, |mut c, r| {
                Box::pin(async move { c.resume_upgrade(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        UpgradeCmd::Abort(p) => {
            simple(p.pool, |mut c, r| {
                Box::pin(async move { c.abort_upgrade(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        UpgradeCmd::Rollback(p) => {
            simple(p.pool, |mut c, r| {
                Box::pin(async move { c.rollback_upgrade(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
    };
    print_status(&s, out);
    Ok(0)
}

async fn rollout(conn: &Conn, cmd: RolloutCmd, out: Output) -> anyhow::Result<i32> {
    type Op = fn(
        OperatorClient<Channel>,
        pb::RolloutRequest,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<pb::RolloutStatus, tonic::Status>> + Send>,
    >;
    let simple = |id: Option<String>, op: Op| async move {
        conn.call(|c| {
            op(
                c,
                pb::RolloutRequest {
                    id: id.clone().unwrap_or_default(),
                },
            )
        })
        .await
    };
    let s = match cmd {
        RolloutCmd::Start(a) => {
            let req = rollout_request(&a);
            let s = conn
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.start_rollout(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            print_rollout(&s, out);
            if a.watch && !a.dry_run {
                return watch_rollout(conn, Some(s.id.clone()), out, a.timeout).await;
            }
            return Ok(0);
        }
        RolloutCmd::Watch(w) => return watch_rollout(conn, w.id, out, w.timeout).await,
        RolloutCmd::Status(a) => {
            simple(a.id, |mut c, r| {
                Box::pin(async move { c.get_rollout(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        RolloutCmd::Pause(a) => {
            simple(a.id, |mut c, r| {
                Box::pin(async move { c.pause_rollout(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        RolloutCmd::Resume(a) => {
            simple(a.id, |mut c, r| {
                Box::pin(async move { c.resume_rollout(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
        RolloutCmd::Abort(a) => {
            simple(a.id, |mut c, r| {
                Box::pin(async move { c.abort_rollout(r).await.map(|r| r.into_inner()) })
            })
            .await?
        }
    };
    print_rollout(&s, out);
    Ok(0)
}

/// A roll-out as JSON (CLI `-o json`).
pub(crate) fn rollout_json(s: &pb::RolloutStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "state": s.state, "reason": s.reason, "version": s.version,
        "max_in_flight": s.max_in_flight, "canary": s.canary, "ended": s.ended,
        "started_by": s.started_by, "started_ms": s.started_ms, "epoch": s.epoch,
        "leader": s.leader, "dry_run": s.dry_run,
        "pools": s.pools.iter().map(|p| serde_json::json!({
            "pool": p.pool, "stage": p.stage, "plan_id": p.plan_id, "reason": p.reason,
            "waiting": p.waiting, "started_ms": p.started_ms, "ended_ms": p.ended_ms,
            "paired_pool": p.paired_pool,
        })).collect::<Vec<_>>(),
    })
}

/// One line of roll-out progress: counts per stage and the pools in flight.
fn rollout_line(s: &pb::RolloutStatus) -> String {
    let count = |stage: &str| s.pools.iter().filter(|p| p.stage == stage).count();
    let flying: Vec<&str> = s
        .pools
        .iter()
        .filter(|p| p.stage == "running" || p.stage == "starting")
        .map(|p| p.pool.as_str())
        .collect();
    let mut line = format!(
        "{} {} completed {}/{} failed {} pending {}",
        s.id,
        s.state,
        count("completed"),
        s.pools.len(),
        count("failed"),
        count("pending"),
    );
    if !flying.is_empty() {
        line.push_str(&format!(" | upgrading: {}", flying.join(" ")));
    }
    if !s.reason.is_empty() {
        line.push_str(&format!(" | {}", s.reason));
    }
    line
}

fn print_rollout(s: &pb::RolloutStatus, out: Output) {
    if out == Output::Json {
        println!("{}", rollout_json(s));
        return;
    }
    if s.dry_run {
        println!("dry run: nothing was started. Every pool's plan resolved; the roll-out:");
    }
    println!(
        "roll-out {}  version {}  status {}{}  max in flight {}{}",
        s.id,
        s.version,
        s.state,
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.reason)
        },
        s.max_in_flight,
        if s.canary.is_empty() {
            String::new()
        } else {
            format!("  canary {}", s.canary)
        }
    );
    println!("POOL                 STAGE      PLAN                           PAIRED       DETAIL");
    for p in &s.pools {
        let detail = if !p.reason.is_empty() {
            p.reason.clone()
        } else if !p.waiting.is_empty() {
            format!("waiting: {}", p.waiting)
        } else if p.ended_ms > p.started_ms && p.started_ms > 0 {
            format!(
                "took {}",
                humantime::format_duration(Duration::from_millis(p.ended_ms - p.started_ms))
            )
        } else {
            String::new()
        };
        println!(
            "{:<20} {:<10} {:<30} {:<12} {}",
            p.pool, p.stage, p.plan_id, p.paired_pool, detail
        );
    }
}

/// Follows a roll-out until it completes, ends otherwise, pauses, or `timeout` passes,
/// reconnecting (to a new leader if need be). Returns the exit code (see [`EXIT_CODES`]).
async fn watch_rollout(
    conn: &Conn,
    id: Option<String>,
    out: Output,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let open = |mut c: OperatorClient<Channel>| {
        let id = id.clone().unwrap_or_default();
        async move {
            c.watch_rollout(pb::RolloutRequest { id })
                .await
                .map(|r| r.into_inner())
        }
    };
    let shown = Shown {
        line: rollout_line,
        json: rollout_json,
        decided: |s: &pb::RolloutStatus| s.ended || s.state == "paused",
    };
    let give_up =
        tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(7 * 24 * 3600));
    let mut last = None;
    let watched = follow(conn, open, out, give_up, &shown, &mut last);
    let s = match timeout {
        None => watched.await,
        Some(t) => match tokio::time::timeout_at(tokio::time::Instant::now() + t, watched).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!(
                    "error: the roll-out is still running after --timeout {}; stopped watching (the roll-out goes on)",
                    humantime::format_duration(t)
                );
                return Ok(EXIT_TIMED_OUT);
            }
        },
    }?;
    if out == Output::Table {
        print_rollout(&s, out);
    }
    Ok(match s.state.as_str() {
        "completed" => EXIT_COMPLETED,
        "paused" => {
            eprintln!(
                "roll-out {} is paused: {}; it needs an operator: rollgate rollout resume (or abort)",
                s.id, s.reason
            );
            EXIT_NEEDS_OPERATOR
        }
        _ => {
            eprintln!("error: roll-out {} ended {}: {}", s.id, s.state, s.reason);
            EXIT_ENDED_BADLY
        }
    })
}

/// Follows an upgrade until it completes, ends otherwise, pauses, or `timeout` passes,
/// reconnecting (to a new leader if need be). Returns the exit code (see [`EXIT_CODES`]).
async fn watch(
    conn: &Conn,
    pool: &str,
    out: Output,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last: Option<pb::UpgradeStatus> = None;
    let watched = watch_until_decided(conn, pool, out, &mut last);
    let decided = match deadline {
        None => watched.await,
        Some(d) => match tokio::time::timeout_at(d, watched).await {
            Ok(r) => r,
            Err(_) => {
                let state = last.as_ref().map_or_else(
                    || "unknown".to_owned(),
                    |s| names::upgrade_state(s.status).to_string(),
                );
                eprintln!(
                    "error: the upgrade of pool {pool} is still {state} after --timeout {}; stopped watching (the upgrade goes on)",
                    humantime::format_duration(timeout.unwrap_or_default())
                );
                return Ok(EXIT_TIMED_OUT);
            }
        },
    }?;
    if out == Output::Table {
        print_status(&decided, out);
    }
    let state = names::upgrade_state(decided.status);
    let reason = if decided.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", decided.reason)
    };
    if decided.status == pb::UpgradeState::Completed as i32 {
        return Ok(EXIT_COMPLETED);
    }
    if decided.status == pb::UpgradeState::Paused as i32 {
        eprintln!(
            "the upgrade of pool {pool} is paused{reason}; it needs an operator: rollgate upgrade resume --pool {pool} (or abort, or rollback)"
        );
        return Ok(EXIT_NEEDS_OPERATOR);
    }
    if decided.status == pb::UpgradeState::None as i32 {
        eprintln!("error: no upgrade on pool {pool}");
    } else {
        eprintln!("error: the upgrade of pool {pool} ended {state}{reason}");
    }
    Ok(EXIT_ENDED_BADLY)
}

/// True for a status that ends a watch: ended, never started, or paused (needs a person).
fn decided(s: &pb::UpgradeStatus) -> bool {
    s.ended
        || s.status == pb::UpgradeState::None as i32
        || s.status == pb::UpgradeState::Paused as i32
}

/// Streams progress lines until a status [`decided`]; `last` keeps the latest status seen.
async fn watch_until_decided(
    conn: &Conn,
    pool: &str,
    out: Output,
    last: &mut Option<pb::UpgradeStatus>,
) -> anyhow::Result<pb::UpgradeStatus> {
    let open = |mut c: OperatorClient<Channel>| {
        let pool = pool.to_owned();
        async move {
            c.watch_upgrade(pb::PoolRequest { pool })
                .await
                .map(|r| r.into_inner())
        }
    };
    let shown = Shown {
        line: progress_line,
        json: status_json,
        decided,
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
    follow(conn, open, out, give_up, &shown, last).await
}

/// How a watched status is shown, and when it ends the watch.
struct Shown<T> {
    /// One progress line (printed when it changes).
    line: fn(&T) -> String,
    /// The whole status, for `-o json` (printed every time).
    json: fn(&T) -> serde_json::Value,
    /// True for a status that ends the watch.
    decided: fn(&T) -> bool,
}

/// Streams the watch `open` starts until a status is [`Shown::decided`], reconnecting (to a
/// new leader if need be) until `give_up`; `last` keeps the latest status seen.
async fn follow<T, F, Fut>(
    conn: &Conn,
    open: F,
    out: Output,
    give_up: tokio::time::Instant,
    shown: &Shown<T>,
    last: &mut Option<T>,
) -> anyhow::Result<T>
where
    F: Fn(OperatorClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Streaming<T>, tonic::Status>>,
    T: Clone,
{
    let mut last_line = String::new();
    loop {
        let mut stream = match conn.call(&open).await {
            Ok(s) => s,
            Err(e) if tokio::time::Instant::now() < give_up => {
                // No leader for a moment (failover): say so once, and try again.
                let line = format!("waiting for a leader: {e}");
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        while let Ok(Some(s)) = stream.message().await {
            let line = (shown.line)(&s);
            if out == Output::Json {
                println!("{}", (shown.json)(&s));
            } else if line != last_line {
                println!("{} {line}", fmt_time(rollgate_common::time::now_ms()));
                last_line = line;
            }
            let done = (shown.decided)(&s);
            *last = Some(s.clone());
            if done {
                return Ok(s);
            }
        }
    }
}

fn fmt_time(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

fn progress_line(s: &pb::UpgradeStatus) -> String {
    let is = |x: &pb::ServerProgress, p: pb::ServerPhase| x.phase == p as i32;
    let done = s
        .servers
        .iter()
        .filter(|x| is(x, pb::ServerPhase::Done))
        .count();
    let flying: Vec<String> = s
        .servers
        .iter()
        .filter(|x| is(x, pb::ServerPhase::InFlight))
        .map(|x| format!("{}:{}", x.server, names::step(x.step)))
        .collect();
    let failed: Vec<String> = s
        .servers
        .iter()
        .filter(|x| is(x, pb::ServerPhase::Failed) || is(x, pb::ServerPhase::Unanswered))
        .map(|x| x.server.clone())
        .collect();
    let mut line = format!(
        "{} {} domain {}/{} {} ({}) done {}/{}",
        s.pool,
        names::upgrade_state(s.status),
        s.domain_index + 1,
        s.domains_total,
        s.current_domain,
        names::domain_phase(s.domain_phase),
        done,
        s.servers.len()
    );
    if !flying.is_empty() {
        line.push_str(&format!(" | {}", flying.join(" ")));
    }
    if !failed.is_empty() {
        line.push_str(&format!(" | failed: {}", failed.join(" ")));
    }
    if !s.reason.is_empty() {
        line.push_str(&format!(" | {}", s.reason));
    }
    if !s.out_of_service.is_empty() {
        let list: Vec<String> = s.out_of_service.iter().map(|o| o.server.clone()).collect();
        line.push_str(&format!(" | OUT OF SERVICE: {}", list.join(" ")));
    }
    if !s.held.is_empty() {
        line.push_str(&format!(" | HELD: {}", s.held));
    }
    line
}

/// An upgrade's status as JSON (CLI `-o json` and the web view).
pub(crate) fn status_json(s: &pb::UpgradeStatus) -> serde_json::Value {
    serde_json::json!({
        "pool": s.pool, "plan_id": s.plan_id, "version": s.version,
        "status": names::upgrade_state(s.status), "reason": s.reason,
        "direction": names::direction(s.direction), "current_domain": s.current_domain,
        "domain_phase": names::domain_phase(s.domain_phase),
        "domain_index": s.domain_index, "domains_total": s.domains_total, "failed_over": s.failed_over,
        "epoch": s.epoch, "leader": s.leader, "ended": s.ended, "held": s.held,
        "servers": s.servers.iter().map(|x| serde_json::json!({
            "server": x.server, "domain": x.domain, "phase": names::server_phase(x.phase),
            "step": names::step(x.step), "attempt": x.attempt,
            "direction": names::direction(x.direction), "message": x.message,
        })).collect::<Vec<_>>(),
        "out_of_service": s.out_of_service.iter().map(|o| serde_json::json!({"server": o.server, "reason": o.reason})).collect::<Vec<_>>(),
    })
}

fn print_status(s: &pb::UpgradeStatus, out: Output) {
    match out {
        Output::Json => println!("{}", status_json(s)),
        Output::Table => {
            if s.status == pb::UpgradeState::None as i32 {
                println!("no upgrade on pool {}", s.pool);
                return;
            }
            println!(
                "pool {}  plan {}  version {}  status {}{}",
                s.pool,
                s.plan_id,
                s.version,
                names::upgrade_state(s.status),
                if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                }
            );
            println!("SERVER       DOMAIN     PHASE       STEP      ATTEMPT  DIRECTION  MESSAGE");
            for x in &s.servers {
                println!(
                    "{:<12} {:<10} {:<11} {:<9} {:<8} {:<10} {}",
                    x.server,
                    x.domain,
                    names::server_phase(x.phase),
                    names::step(x.step),
                    x.attempt,
                    names::direction(x.direction),
                    x.message
                );
            }
            for o in &s.out_of_service {
                println!("OUT OF SERVICE: {}: {}", o.server, o.reason);
            }
            if !s.held.is_empty() {
                println!("HELD: {}", s.held);
            }
        }
    }
}

fn print_plan(s: &pb::UpgradeStatus, out: Output) {
    match out {
        Output::Json => println!("{}", s.plan_json),
        Output::Table => {
            println!("dry run: nothing was started. The plan:");
            println!("{}", s.plan_json);
        }
    }
}

fn print_history(pool: &str, plans: &[pb::PastPlan], out: Output) {
    let took = |p: &pb::PastPlan| {
        humantime::format_duration(Duration::from_secs(
            p.ended_ms.saturating_sub(p.started_ms) / 1000,
        ))
        .to_string()
    };
    if out == Output::Json {
        let v: Vec<_> = plans
            .iter()
            .map(|p| {
                serde_json::json!({
                    "plan": p.plan_id, "version": p.version, "started_by": p.started_by,
                    "started_ms": p.started_ms, "ended_ms": p.ended_ms,
                    "duration_ms": p.ended_ms.saturating_sub(p.started_ms),
                    "outcome": p.outcome, "reason": p.reason, "servers": p.servers,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return;
    }
    if plans.is_empty() {
        println!("no past plans on pool {pool}");
        return;
    }
    println!("PLAN                       VERSION    STARTED BY            STARTED               DURATION  SERVERS  OUTCOME");
    for p in plans {
        println!(
            "{:<26} {:<10} {:<21} {:<21} {:<9} {:<8} {}{}",
            p.plan_id,
            p.version,
            p.started_by,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(p.started_ms)
            )
            .to_string(),
            took(p),
            p.servers,
            p.outcome,
            if p.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.reason)
            }
        );
    }
}

/// A pool's readiness as JSON (CLI `-o json` and the web view).
pub(crate) fn readiness_json(r: &pb::PoolReadiness) -> serde_json::Value {
    serde_json::json!({
        "pool": r.pool, "PoolUpgradeState": names::readiness_state(r.state), "reason": r.reason, "min_active": r.min_active,
        "active": r.active, "total": r.total, "failed_over": r.failed_over,
        "domains": r.domains.iter().map(|d| serde_json::json!({
            "name": d.name, "ReadyForUpgrade": d.ready_for_upgrade, "reason": d.reason,
            "servers": d.servers.iter().map(|s| serde_json::json!({"server": s.server, "state": names::server_state(s.state), "version": s.version, "active": s.active, "busy": s.busy, "healthy": s.healthy, "connections": s.active_connections, "detail": s.detail})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// An event as JSON (CLI `-o json` and the web view).
pub(crate) fn event_json(e: &pb::Event) -> serde_json::Value {
    serde_json::json!({"seq": e.seq, "at_ms": e.at_ms, "plan": e.plan_id, "epoch": e.epoch, "coordinator": e.coordinator, "kind": e.kind, "server": e.server, "domain": e.domain, "message": e.message})
}

fn print_readiness(pools: &[pb::PoolReadiness], out: Output) {
    if out == Output::Json {
        let v: Vec<_> = pools.iter().map(readiness_json).collect();
        println!(
            "{}",
            if v.len() == 1 {
                v[0].clone()
            } else {
                serde_json::Value::Array(v)
            }
        );
        return;
    }
    for r in pools {
        println!(
            "Pool {}: PoolUpgradeState {} ({}){}",
            r.pool,
            names::readiness_state(r.state),
            r.reason,
            if r.failed_over { " [failed over]" } else { "" }
        );
        let servers: Vec<&pb::ServerReadiness> =
            r.domains.iter().flat_map(|d| &d.servers).collect();
        let lost = servers
            .iter()
            .filter(|s| names::server_state(s.state) == "lost")
            .count();
        let mut versions: std::collections::BTreeMap<&str, usize> = Default::default();
        for s in &servers {
            *versions.entry(s.version.as_str()).or_default() += 1;
        }
        let versions: Vec<String> = versions
            .iter()
            .map(|(v, n)| format!("{} x{n}", if v.is_empty() { "?" } else { v }))
            .collect();
        println!(
            "{} server(s), {} active, {lost} lost; versions: {}",
            servers.len(),
            r.active,
            versions.join(", ")
        );
        println!(
            "DOMAIN     READY  SERVER       STATE       VERSION    ACTIVE  BUSY   CONNS  DETAIL"
        );
        for d in &r.domains {
            for (i, s) in d.servers.iter().enumerate() {
                let (dn, ready) = if i == 0 {
                    (
                        d.name.as_str(),
                        if d.ready_for_upgrade { "yes" } else { "no" },
                    )
                } else {
                    ("", "")
                };
                println!(
                    "{:<10} {:<6} {:<12} {:<11} {:<10} {:<7} {:<6} {:<6} {}",
                    dn,
                    ready,
                    s.server,
                    names::server_state(s.state),
                    s.version,
                    s.active,
                    s.busy,
                    s.active_connections,
                    s.detail
                );
            }
        }
    }
}

/// Writes `<dir>/<name>.1` for `cmd` and, recursively, `<name>-<sub>.1` for its subcommands.
fn write_man_pages(cmd: clap::Command, dir: &std::path::Path, name: &str) -> anyhow::Result<usize> {
    let mut written = 0;
    for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        let sub_name = format!("{name}-{}", sub.get_name());
        written += write_man_pages(sub.clone().name(sub_name.clone()), dir, &sub_name)?;
    }
    let path = dir.join(format!("{name}.1"));
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut text)?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(written + 1)
}

/// Writes generated text to stdout; a reader that stops early (`| head`) is not an error.
fn print_bytes(text: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn certs(c: &CertsCmd, out: Output) -> anyhow::Result<()> {
    match c {
        CertsCmd::Init { dir, name } => {
            std::fs::create_dir_all(dir)?;
            if dir.join("ca.key").exists() {
                bail!(
                    "{} already exists: refusing to overwrite a CA",
                    dir.join("ca.key").display()
                );
            }
            let ca = Ca::generate(name)?;
            rollgate_common::pki::write_file(&dir.join("ca.crt"), ca.cert_pem(), 0o644)?;
            rollgate_common::pki::write_file(&dir.join("ca.key"), &ca.key_pem(), 0o600)?;
            let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"cert": crt.display().to_string(), "key": key.display().to_string()})
                ),
                Output::Table => println!("wrote {} and {}", crt.display(), key.display()),
            }
        }
        CertsCmd::Issue {
            dir,
            role,
            name,
            host,
        } => {
            let kind = match role.as_str() {
                "agent" => RoleKind::Agent,
                "coordinator" => RoleKind::Coordinator,
                "operator" => RoleKind::Operator,
                other => bail!("role {other:?} is not agent, coordinator or operator"),
            };
            let role = Role::new(kind, name);
            if Role::parse_uri(&role.uri()).is_none() {
                bail!("name {name:?} must be letters, digits, '-', '_' or '.'");
            }
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("cannot read {}", dir.join(f).display()))
            };
            let ca = Ca::from_pem(&read("ca.crt")?, &read("ca.key")?)?;
            let issued = ca.issue(&role, host)?;
            let (crt, key) = issued.write(dir, &format!("{kind}-{name}"))?;
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"cert": crt.display().to_string(), "key": key.display().to_string(), "role": role.uri()})
                ),
                Output::Table => println!(
                    "wrote {} and {} for {}",
                    crt.display(),
                    key.display(),
                    role.uri()
                ),
            }
        }
    }
    Ok(())
}
