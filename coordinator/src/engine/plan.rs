//! The upgrade plan: what to install where, in which order, and which policies apply.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long to wait between two readiness checks that answered Busy (the procedure's 10 minutes).
pub const DEFAULT_BUSY_RETRY_INTERVAL: Duration = Duration::from_secs(600);

/// How many Busy answers exhaust the patience (the procedure's "three or more times").
pub const DEFAULT_BUSY_RETRIES: u32 = 3;

/// Upper bounds of every duration and count in a plan. A plan beyond them is refused when it
/// is started, and a stored one found beyond them pauses instead of running: no value in a
/// plan can crash a coordinator or hold a pool for years.
pub mod bounds {
    use std::time::Duration;

    /// drain_timeout, verify_stable, verify_timeout and busy_retry_interval.
    pub const MAX_STEP_WAIT: Duration = Duration::from_secs(24 * 3600);
    /// canary_soak.
    pub const MAX_CANARY_SOAK: Duration = Duration::from_secs(7 * 24 * 3600);
    /// busy_retries.
    pub const MAX_BUSY_RETRIES: u32 = 100;
    /// server_retries.
    pub const MAX_SERVER_RETRIES: u32 = 20;
    /// parallelism.
    pub const MAX_PARALLELISM: u32 = 10_000;
    /// version, sha256 and the names in a plan.
    pub const MAX_NAME_LEN: usize = rollgate_common::config::MAX_NAME_LEN;
    /// artifact and rollback_artifact (a path or URL).
    pub const MAX_ARTIFACT_LEN: usize = 4096;
}

/// How a server stops taking traffic before it is patched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainMode {
    /// Refuse new connections and let existing ones finish, up to `timeout`.
    Graceful {
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
    /// Stop at once: only for a declared outage.
    Immediate,
}

/// What to do when the pool stays Busy for `busy_retries` answers, or lacks active front ends.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExhaustedAction {
    /// Fail the pool over to its paired pool, then patch without further readiness gating.
    Failover,
    /// Wait for an operator.
    #[default]
    Pause,
    /// Give up.
    Abort,
}

/// What to do when a server still fails after its retries.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    /// Wait for an operator; Resume retries the failed server.
    #[default]
    Pause,
    /// Put every server this plan touched back on the previous version.
    Rollback,
}

/// An upgrade domain: servers that may be taken out of service together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Domain {
    pub name: String,
    pub servers: Vec<String>,
}

/// Everything the engine needs to patch one pool. Fields with defaults may be left out of a
/// serialized plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Unique plan id; it prefixes every operation id, so agents dedupe per plan.
    pub id: String,
    pub pool: String,
    pub version: String,
    pub artifact: String,
    pub sha256: String,
    pub drain: DrainMode,
    /// Servers of one domain in flight at once, >= 1.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
    #[serde(with = "humantime_serde")]
    pub verify_stable: Duration,
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Duration,
    #[serde(default = "default_busy_retry_interval", with = "humantime_serde")]
    pub busy_retry_interval: Duration,
    /// The Nth Busy answer (N = busy_retries) exhausts.
    #[serde(default = "default_busy_retries")]
    pub busy_retries: u32,
    #[serde(default)]
    pub on_exhausted: ExhaustedAction,
    /// Extra attempts per failed step (0 = no retry).
    #[serde(default)]
    pub server_retries: u32,
    #[serde(default)]
    pub on_failure: FailureAction,
    /// In upgrade order.
    pub domains: Vec<Domain>,
    /// If set, the first domain is a canary: after it completes, wait this long before the next.
    #[serde(default, with = "humantime_serde")]
    pub canary_soak: Option<Duration>,
    #[serde(default)]
    pub paired_pool: Option<String>,
    /// Active servers the pool keeps, fixed when the plan starts (a later config change does
    /// not move it mid-upgrade). `None` only in plans stored by older versions.
    #[serde(default)]
    pub min_active: Option<u32>,
    /// The artifact of the version the servers ran before this plan, for servers whose
    /// version was installed outside rollgate (their first managed upgrade): what a rollback
    /// installs when the agent has no previous artifact of its own.
    #[serde(default)]
    pub rollback_artifact: Option<RollbackArtifact>,
    /// When domains may start (UTC, weekly), fixed when the plan starts; empty: any time.
    /// Outside them the upgrade waits between domains; rollbacks and restores never wait.
    #[serde(default)]
    pub windows: Vec<super::window::Window>,
}

/// Where the previous version's artifact is, and its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackArtifact {
    pub artifact: String,
    pub sha256: String,
}

fn default_parallelism() -> u32 {
    1
}

fn default_busy_retry_interval() -> Duration {
    DEFAULT_BUSY_RETRY_INTERVAL
}

fn default_busy_retries() -> u32 {
    DEFAULT_BUSY_RETRIES
}

/// Why a plan cannot be run. Each message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("domains must not be empty")]
    NoDomains,
    #[error("domains: a domain has an empty name")]
    EmptyDomainName,
    #[error("domains: domain `{domain}` has no servers")]
    EmptyDomain { domain: String },
    #[error("domains: domain `{domain}` lists a server with an empty name")]
    EmptyServerName { domain: String },
    #[error("domains: domain name `{domain}` is used twice")]
    DuplicateDomain { domain: String },
    #[error("domains: server `{server}` is listed in both `{first}` and `{second}`")]
    DuplicateServer {
        server: String,
        first: String,
        second: String,
    },
    #[error("parallelism must be at least 1")]
    ZeroParallelism,
    #[error("busy_retries must be at least 1")]
    ZeroBusyRetries,
    #[error(
        "verify_stable ({}) must not exceed verify_timeout ({})",
        humantime::format_duration(*.stable),
        humantime::format_duration(*.timeout)
    )]
    VerifyStableExceedsTimeout { stable: Duration, timeout: Duration },
    #[error("on_exhausted = failover needs paired_pool to be set")]
    FailoverWithoutPairedPool,
    #[error(
        "{field} ({}) exceeds its upper bound of {}",
        humantime::format_duration(*.value),
        humantime::format_duration(*.max)
    )]
    DurationTooLong {
        field: &'static str,
        value: Duration,
        max: Duration,
    },
    #[error("{field} ({value}) exceeds its upper bound of {max}")]
    CountTooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{field} is {len} characters long; at most {max} are allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("sha256 {0:?} is not 64 hex digits")]
    BadSha256(String),
    #[error(
        "version {} must be printable ASCII without spaces: every agent refuses any other",
        rollgate_common::quote::quoted(.0)
    )]
    BadVersion(String),
}

impl Plan {
    /// Checks everything the engine relies on, bounds included; the engine never launches a
    /// step of an invalid plan.
    pub fn validate(&self) -> Result<(), PlanError> {
        use bounds::*;
        for (field, value, max) in [
            ("id", &self.id, MAX_NAME_LEN * 2),
            ("pool", &self.pool, MAX_NAME_LEN),
            ("version", &self.version, MAX_NAME_LEN),
            ("artifact", &self.artifact, MAX_ARTIFACT_LEN),
        ] {
            if value.trim().is_empty() {
                return Err(PlanError::EmptyField { field });
            }
            if value.len() > max {
                return Err(PlanError::TooLong {
                    field,
                    len: value.len(),
                    max,
                });
            }
        }
        check_sha256(&self.sha256)?;
        // The agents' own rule (the length is checked above): a plan they would all refuse
        // is refused before it starts, not at its first server.
        if !self.version.chars().all(|c| c.is_ascii_graphic()) {
            return Err(PlanError::BadVersion(self.version.clone()));
        }
        if let Some(r) = &self.rollback_artifact {
            if r.artifact.trim().is_empty() {
                return Err(PlanError::EmptyField {
                    field: "rollback_artifact",
                });
            }
            if r.artifact.len() > MAX_ARTIFACT_LEN {
                return Err(PlanError::TooLong {
                    field: "rollback_artifact",
                    len: r.artifact.len(),
                    max: MAX_ARTIFACT_LEN,
                });
            }
            check_sha256(&r.sha256)?;
        }
        let mut waits = vec![
            ("verify_stable", self.verify_stable, MAX_STEP_WAIT),
            ("verify_timeout", self.verify_timeout, MAX_STEP_WAIT),
            (
                "busy_retry_interval",
                self.busy_retry_interval,
                MAX_STEP_WAIT,
            ),
        ];
        if let DrainMode::Graceful { timeout } = self.drain {
            waits.push(("drain_timeout", timeout, MAX_STEP_WAIT));
        }
        if let Some(soak) = self.canary_soak {
            waits.push(("canary_soak", soak, MAX_CANARY_SOAK));
        }
        for (field, value, max) in waits {
            if value > max {
                return Err(PlanError::DurationTooLong { field, value, max });
            }
        }
        for (field, value, max) in [
            ("parallelism", self.parallelism, MAX_PARALLELISM),
            ("busy_retries", self.busy_retries, MAX_BUSY_RETRIES),
            ("server_retries", self.server_retries, MAX_SERVER_RETRIES),
        ] {
            if value > max {
                return Err(PlanError::CountTooLarge {
                    field,
                    value: u64::from(value),
                    max: u64::from(max),
                });
            }
        }
        if self.domains.is_empty() {
            return Err(PlanError::NoDomains);
        }
        let mut domain_names = BTreeMap::new();
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for domain in &self.domains {
            if domain.name.trim().is_empty() {
                return Err(PlanError::EmptyDomainName);
            }
            if domain_names.insert(domain.name.as_str(), ()).is_some() {
                return Err(PlanError::DuplicateDomain {
                    domain: domain.name.clone(),
                });
            }
            if domain.servers.is_empty() {
                return Err(PlanError::EmptyDomain {
                    domain: domain.name.clone(),
                });
            }
            for server in &domain.servers {
                if server.trim().is_empty() {
                    return Err(PlanError::EmptyServerName {
                        domain: domain.name.clone(),
                    });
                }
                // The agent refuses longer operation ids: the plan could never run a step.
                let longest = crate::engine::Upgrade::op_id(
                    &self.id,
                    server,
                    crate::engine::Direction::Restore,
                    crate::engine::Step::Rollback,
                    u32::MAX,
                );
                if longest.len() > rollgate_common::config::MAX_OPERATION_ID_LEN {
                    return Err(PlanError::TooLong {
                        field: "operation id (plan id and server name)",
                        len: longest.len(),
                        max: rollgate_common::config::MAX_OPERATION_ID_LEN,
                    });
                }
                if let Some(first) = owner.insert(server.as_str(), domain.name.as_str()) {
                    return Err(PlanError::DuplicateServer {
                        server: server.clone(),
                        first: first.to_string(),
                        second: domain.name.clone(),
                    });
                }
            }
        }
        if self.parallelism == 0 {
            return Err(PlanError::ZeroParallelism);
        }
        if self.busy_retries == 0 {
            return Err(PlanError::ZeroBusyRetries);
        }
        if self.verify_stable > self.verify_timeout {
            return Err(PlanError::VerifyStableExceedsTimeout {
                stable: self.verify_stable,
                timeout: self.verify_timeout,
            });
        }
        if self.on_exhausted == ExhaustedAction::Failover && self.paired().is_none() {
            return Err(PlanError::FailoverWithoutPairedPool);
        }
        Ok(())
    }

    /// The paired pool, if one is named.
    pub fn paired(&self) -> Option<&str> {
        self.paired_pool.as_deref().filter(|p| !p.trim().is_empty())
    }

    /// The step that takes a server down, forward or backward.
    pub fn down_step(&self) -> super::Step {
        match self.drain {
            DrainMode::Graceful { .. } => super::Step::Drain,
            DrainMode::Immediate => super::Step::Stop,
        }
    }

    /// The servers of every domain, in plan order.
    pub fn servers(&self) -> impl Iterator<Item = &String> {
        self.domains.iter().flat_map(|d| d.servers.iter())
    }

    /// Index of the domain holding `server`.
    pub fn domain_of(&self, server: &str) -> Option<usize> {
        self.domains
            .iter()
            .position(|d| d.servers.iter().any(|s| s == server))
    }
}

fn check_sha256(sha: &str) -> Result<(), PlanError> {
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PlanError::BadSha256(sha.chars().take(80).collect()));
    }
    Ok(())
}
