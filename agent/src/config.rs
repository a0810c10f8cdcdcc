//! The agent's configuration: one TOML file (see deploy/agent.example.toml for every field).

use rollgate_common::config::{check_name, load_toml, ConfigError};
use rollgate_common::tls::{Role, RoleKind, TlsFiles};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the agent needs to know.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This server's id; must match the agent role in its certificate.
    pub server_id: String,
    /// The pool this server belongs to.
    pub pool: String,
    /// The upgrade domain this server belongs to (may be empty: the coordinator assigns one).
    #[serde(default)]
    pub upgrade_domain: String,
    /// Where the agent's gRPC API listens.
    pub listen: SocketAddr,
    /// Where the journal, the epoch, the state and the artifact cache live.
    pub state_dir: PathBuf,
    /// mTLS files. Required unless `insecure = true`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Serve without TLS and without role checks. For local demos only; logged loudly.
    #[serde(default)]
    pub insecure: bool,
    /// How often health is probed; a report is pushed to watchers when it changes.
    #[serde(default = "default_report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
    /// How often watchers get the last report again when nothing changed: the heartbeat by
    /// which a coordinator tells a live agent from a hung one. It never waits on a probe.
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The largest gRPC message the agent accepts.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long a running operation may take to finish after SIGTERM before the agent exits.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log format: "text" or "json".
    #[serde(default)]
    pub log_format: rollgate_common::telemetry::LogFormat,
    /// Log level when RUST_LOG is not set.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// `[http]`: Prometheus metrics at `/metrics` (off when absent; 127.0.0.1:9181 when the
    /// table gives no address).
    #[serde(default)]
    pub http: Option<rollgate_common::http::HttpConfig>,
    /// Joins `pool` (in `upgrade_domain`, or one assigned) by itself at start: no coordinator
    /// config edit. Absent: the coordinators' config must list this server.
    #[serde(default)]
    pub join: Option<JoinConfig>,
    /// The local service this agent drives.
    pub service: ServiceConfig,
}

/// Joining a pool by itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// Coordinators to ask (host:port of their API); the leader answers, a follower points to it.
    pub coordinators: Vec<String>,
    /// Where coordinators reach this agent (host:port). Default: `listen`, which then must name
    /// a real address, not 0.0.0.0 or [::].
    #[serde(default)]
    pub advertise: Option<String>,
}

impl JoinConfig {
    /// The address told to coordinators.
    pub fn address(&self, listen: SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| listen.to_string())
    }
}

/// How to drive the local service. Commands are argv lists, run without a shell.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// TCP ports the service serves on; probed with a real connect, and their established
    /// connections counted by the kernel's sock_diag (else from /proc/net/tcp and tcp6).
    pub ports: Vec<u16>,
    /// The address probes connect to.
    #[serde(default = "default_probe_host")]
    pub probe_host: String,
    /// A systemd unit: when set, `start`, `stop` and `restart` default to systemctl.
    #[serde(default)]
    pub systemd_unit: Option<String>,
    /// Makes the service stop taking new connections while open ones finish.
    pub drain: Vec<String>,
    /// Starts the service; must return once it has started (daemonising or via systemd).
    #[serde(default)]
    pub start: Vec<String>,
    /// Stops the service at once.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Restarts the service; default: `stop` then `start`.
    #[serde(default)]
    pub restart: Vec<String>,
    /// Installs an artifact. Runs with ROLLGATE_ARTIFACT (a verified local file),
    /// ROLLGATE_VERSION, ROLLGATE_PREVIOUS_VERSION, ROLLGATE_SERVER_ID, ROLLGATE_OPERATION_ID
    /// and ROLLGATE_ROLLBACK ("1" for a rollback) in its environment.
    pub install: Vec<String>,
    /// Prints the installed version; used until the agent has installed one itself.
    #[serde(default)]
    pub version_command: Vec<String>,
    /// Exits 0 while the service is busy (e.g. re-syncing after a restart), 1 when it is not.
    #[serde(default)]
    pub busy_command: Vec<String>,
    /// Optional HTTP health URL: healthy when it answers 2xx.
    #[serde(default)]
    pub health_url: Option<String>,
    /// Time limit for drain, start, stop, restart, version and busy commands.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub hook_timeout: Duration,
    /// How long a graceful drain waits for connections to reach zero, unless the call says.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long the install command may run, unless the call says.
    #[serde(default = "default_install_timeout", with = "humantime_serde")]
    pub install_timeout: Duration,
    /// How long a restart waits for the service to accept connections, unless the call says.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long one whole artifact download may take. A stalled download would otherwise hold
    /// the call (and the caller's plan) until the caller's own deadline, with no clear cause.
    #[serde(default = "default_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// How long connecting to an artifact server may take: an unreachable server fails fast
    /// instead of using up `fetch_timeout`.
    #[serde(default = "default_fetch_connect_timeout", with = "humantime_serde")]
    pub fetch_connect_timeout: Duration,
    /// The longest silence from an artifact server, before the response headers or between two
    /// reads of the body: a stalled download fails at once, however large `fetch_timeout` is.
    #[serde(default = "default_fetch_idle_timeout", with = "humantime_serde")]
    pub fetch_idle_timeout: Duration,
    /// Directories local artifacts (a path or file:// URL) may be read from, resolved with
    /// symlinks before the check. Empty (the default): local artifacts are refused. Without
    /// this, any caller could have the agent read (and, via the checksum check, probe) any
    /// file on the server.
    #[serde(default)]
    pub artifact_dirs: Vec<PathBuf>,
    /// How long verify needs the service good without a break, unless the call says.
    #[serde(default = "default_verify_stable", with = "humantime_serde")]
    pub verify_stable: Duration,
    /// How long verify tries before failing, unless the call says.
    #[serde(default = "default_verify_timeout", with = "humantime_serde")]
    pub verify_timeout: Duration,
    /// Time limit of one probe (TCP connect, HTTP health).
    #[serde(default = "default_probe_timeout", with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// The largest artifact the agent downloads.
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
}

fn default_report_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_heartbeat_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_max_message_bytes() -> usize {
    256 * 1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_log_level() -> String {
    "info".into()
}
fn default_probe_host() -> String {
    "127.0.0.1".into()
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_install_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_fetch_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_fetch_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_fetch_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_verify_stable() -> Duration {
    Duration::from_secs(5)
}
fn default_verify_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_max_artifact_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}

impl AgentConfig {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut cfg: AgentConfig = load_toml(path)?;
        cfg.resolve_defaults();
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// Fills commands implied by `systemd_unit`.
    pub fn resolve_defaults(&mut self) {
        let s = &mut self.service;
        if let Some(unit) = s.systemd_unit.clone() {
            let ctl = |verb: &str| vec!["systemctl".to_owned(), verb.to_owned(), unit.clone()];
            if s.start.is_empty() {
                s.start = ctl("start");
            }
            if s.stop.is_empty() {
                s.stop = ctl("stop");
            }
            if s.restart.is_empty() {
                s.restart = ctl("restart");
            }
        }
    }

    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        check_name("server_id", &self.server_id)?;
        check_name("pool", &self.pool)?;
        if !self.upgrade_domain.is_empty() {
            check_name("upgrade_domain", &self.upgrade_domain)?;
        }
        match (&self.tls, self.insecure) {
            (None, false) => {
                return Err(
                    "tls: missing [tls] section (ca, cert, key); set insecure = true \
                            only for a local demo"
                        .into(),
                )
            }
            (Some(_), true) => {
                return Err("insecure = true and [tls] are both set: choose one".into())
            }
            (Some(tls), false) => tls.check_role(&Role::new(RoleKind::Agent, &self.server_id))?,
            (None, true) => {}
        }
        if let Some(j) = &self.join {
            if j.coordinators.is_empty() {
                return Err("join.coordinators: at least one coordinator address is needed".into());
            }
            for c in &j.coordinators {
                if !c.contains(':') {
                    return Err(format!("join.coordinators: {c:?} is not host:port"));
                }
            }
            match &j.advertise {
                Some(a) if !a.contains(':') => {
                    return Err(format!("join.advertise: {a:?} is not host:port"))
                }
                None if self.listen.ip().is_unspecified() => {
                    return Err(format!(
                        "join.advertise: listen is {}, which coordinators cannot dial: set the address they reach this agent at",
                        self.listen
                    ))
                }
                _ => {}
            }
            if self.tls.is_none() {
                return Err("join: joining needs [tls] (the certificate names the server)".into());
            }
        }
        if self.report_interval < Duration::from_millis(100) {
            return Err("report_interval: must be at least 100ms".into());
        }
        if self.heartbeat_interval < Duration::from_millis(50)
            || self.heartbeat_interval > Duration::from_secs(60)
        {
            return Err("heartbeat_interval: must be between 50ms and 60s".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes: must be at least 1024".into());
        }
        let s = &self.service;
        if s.ports.is_empty() {
            return Err("service.ports: at least one port is needed".into());
        }
        if s.ports.contains(&0) {
            return Err("service.ports: 0 is not a port".into());
        }
        for (field, argv) in [
            ("service.drain", &s.drain),
            ("service.start", &s.start),
            ("service.stop", &s.stop),
            ("service.install", &s.install),
        ] {
            if argv.is_empty() || argv[0].is_empty() {
                return Err(format!("{field}: a command (argv list) is required"));
            }
        }
        if let Some(url) = &s.health_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("service.health_url: {url:?} is not an http(s) URL"));
            }
        }
        for (field, d) in [
            ("service.hook_timeout", s.hook_timeout),
            ("service.drain_timeout", s.drain_timeout),
            ("service.install_timeout", s.install_timeout),
            ("service.start_timeout", s.start_timeout),
            ("service.fetch_timeout", s.fetch_timeout),
            ("service.fetch_connect_timeout", s.fetch_connect_timeout),
            ("service.fetch_idle_timeout", s.fetch_idle_timeout),
            ("service.verify_timeout", s.verify_timeout),
            ("service.probe_timeout", s.probe_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{field}: must be more than 0s"));
            }
        }
        for dir in &s.artifact_dirs {
            if !dir.is_absolute() {
                return Err(format!(
                    "service.artifact_dirs: {} is not an absolute path",
                    dir.display()
                ));
            }
            if dir
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(format!(
                    "service.artifact_dirs: {} contains \"..\"; give the directory itself",
                    dir.display()
                ));
            }
            if dir.parent().is_none() {
                return Err(
                    "service.artifact_dirs: \"/\" would let callers read every file on the server; list the directories that hold artifacts"
                        .into(),
                );
            }
        }
        Ok(())
    }
}
