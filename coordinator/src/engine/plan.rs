//! The upgrade plan: what to install where, in which order, and which policies apply.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long to wait between two readiness checks that answered Busy (the procedure's 10 minutes).
pub const DEFAULT_BUSY_RETRY_INTERVAL: Duration = Duration::from_secs(600);

/// How many Busy answers exhaust the patience (the procedure's "three or more times").
pub const DEFAULT_BUSY_RETRIES: u32 = 3;

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
}

impl Plan {
    /// Checks everything the engine relies on; the engine never runs an invalid plan.
    pub fn validate(&self) -> Result<(), PlanError> {
        for (field, value) in [
            ("id", &self.id),
            ("pool", &self.pool),
            ("version", &self.version),
            ("sha256", &self.sha256),
        ] {
            if value.trim().is_empty() {
                return Err(PlanError::EmptyField { field });
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

    /// The first step of every server chain, forward or backward.
    pub fn first_step(&self) -> super::Step {
        match self.drain {
            DrainMode::Graceful { .. } => super::Step::Drain,
            DrainMode::Immediate => super::Step::Stop,
        }
    }

    /// Index of the domain holding `server`.
    pub fn domain_of(&self, server: &str) -> Option<usize> {
        self.domains
            .iter()
            .position(|d| d.servers.iter().any(|s| s == server))
    }
}
