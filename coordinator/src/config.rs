//! The coordinator's configuration: one TOML file (see deploy/coordinator.example.toml).

use rollgate_common::config::{check_name, load_toml, ConfigError};
use rollgate_common::tls::{Role, RoleKind, TlsFiles};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything a coordinator needs to know.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This coordinator's id; must match the coordinator role in its certificate.
    pub id: String,
    /// Where the operator API listens.
    pub listen: SocketAddr,
    /// The address clients are told to use for this coordinator (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where leadership and progress live.
    pub store: StoreConfig,
    /// mTLS files; required unless `insecure = true`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// No TLS, no role checks: local demos only, logged loudly.
    #[serde(default)]
    pub insecure: bool,
    /// A server whose agent has not reported for this long counts as lost (not active).
    #[serde(default = "default_lost_after", with = "humantime_serde")]
    pub lost_after: Duration,
    /// A server that started serving less than this long ago makes its pool Busy.
    #[serde(default, with = "humantime_serde")]
    pub stabilization: Duration,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log format and level.
    #[serde(default)]
    pub log_format: rollgate_common::telemetry::LogFormat,
    /// Log level when RUST_LOG is not set.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// `[http]`: the web view at `/` and Prometheus metrics at `/metrics` (off when absent;
    /// 127.0.0.1:9180 when the table gives no address).
    #[serde(default)]
    pub http: Option<rollgate_common::http::HttpConfig>,
    /// The pools this coordinator upgrades.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

/// Which store, and its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum StoreConfig {
    /// A local file, for a single coordinator (locked against a second one).
    Embedded {
        /// The store file (its snapshot); its log is `<path>.log` and its lock `<path>.lock`,
        /// beside it.
        path: PathBuf,
    },
    /// etcd v3, for several coordinators.
    Etcd {
        /// Client URLs, e.g. "http://127.0.0.1:2379".
        endpoints: Vec<String>,
        /// Key prefix for this deployment.
        #[serde(default = "default_prefix")]
        prefix: String,
        /// The leader lease TTL (whole seconds, at least 2s).
        #[serde(default = "default_ttl", with = "humantime_serde")]
        election_ttl: Duration,
        /// TLS to etcd: required for `https://` endpoints.
        #[serde(default)]
        tls: Option<EtcdTls>,
        /// etcd user/password authentication.
        #[serde(default)]
        auth: Option<EtcdAuth>,
        /// Allows plaintext `http://` endpoints. Whoever can reach a plaintext etcd can write a
        /// plan and so run code on every server: local tests and demos only.
        #[serde(default)]
        insecure: bool,
    },
}

/// TLS to etcd: the CA that signed etcd's server certificates and, when etcd checks client
/// certificates (`--client-cert-auth`), this coordinator's client certificate and key.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate (PEM) for etcd's server certificates.
    pub ca: PathBuf,
    /// Client certificate (PEM), for etcd's client-certificate authentication.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM), with `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name etcd's certificate is checked against, when it differs from the endpoints' host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// etcd user/password authentication. The password lives in a file of its own, readable by
/// its owner only, so the config file can be shared and reviewed.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdAuth {
    /// The etcd user.
    pub user: String,
    /// A file holding the password (trailing newline ignored); mode 0600 or stricter.
    pub password_file: PathBuf,
}

impl EtcdAuth {
    /// Reads the password, refusing a file that others may read.
    pub fn password(&self) -> Result<String, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = &self.password_file;
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("store.auth.password_file {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!(
                "store.auth.password_file {}: not a regular file",
                path.display()
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "store.auth.password_file {}: mode {mode:o} lets others read it; chmod 600 it",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("store.auth.password_file {}: {e}", path.display()))?;
        let password = text.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(format!(
                "store.auth.password_file {}: empty",
                path.display()
            ));
        }
        Ok(password.to_owned())
    }
}

impl EtcdTls {
    /// Checks that the files exist and that cert and key come together.
    pub fn check(&self) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("store.tls: cert and key go together: set both or neither".into())
            }
            _ => {}
        }
        let files = [
            ("ca", Some(&self.ca)),
            ("cert", self.cert.as_ref()),
            ("key", self.key.as_ref()),
        ];
        for (what, p) in files {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(format!("store.tls.{what}: no such file {}", p.display()));
                }
            }
        }
        Ok(())
    }
}

/// How many servers of a pool must stay active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinActive {
    /// A majority: floor(n/2)+1.
    Majority,
    /// A fixed count.
    Count(u32),
    /// A percentage of the pool, rounded up.
    Percent(u32),
}

impl<'de> Deserialize<'de> for MinActive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MinActive::Count(n)),
            Raw::S(s) if s == "majority" => Ok(MinActive::Majority),
            Raw::S(s) => s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| *p <= 100)
                .map(MinActive::Percent)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "min_active {s:?}: write a count, \"NN%\" or \"majority\""
                    ))
                }),
        }
    }
}

impl PoolConfig {
    /// The parsed maintenance windows.
    pub fn windows(&self) -> Result<Vec<crate::engine::window::Window>, String> {
        self.maintenance_windows
            .iter()
            .map(|w| {
                w.parse()
                    .map_err(|e| format!("pools.{}.maintenance_windows: {e}", self.name))
            })
            .collect()
    }
}

impl MinActive {
    /// The count for a pool of `n` servers.
    pub fn resolve(self, n: usize) -> usize {
        match self {
            MinActive::Majority => n / 2 + 1,
            MinActive::Count(c) => c as usize,
            MinActive::Percent(p) => (n * p as usize).div_ceil(100),
        }
    }
}

/// One pool of front ends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's name.
    pub name: String,
    /// How many servers must stay active (default: a majority).
    #[serde(default = "default_min_active")]
    pub min_active: MinActive,
    /// Servers without an explicit `upgrade_domain` are spread over this many domains,
    /// deterministically (sorted by id, round-robin into ud-1..ud-N).
    #[serde(default)]
    pub upgrade_domains: Option<u32>,
    /// The paired backup pool for disaster recovery, if any. A pool and its paired pool are
    /// never upgraded at the same time.
    #[serde(default)]
    pub paired_pool: Option<String>,
    /// Labels a roll-out selects pools by, e.g. `{ tier = "web", region = "eu" }`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Fails the pool over to its paired pool (env: ROLLGATE_POOL, ROLLGATE_PAIRED_POOL,
    /// ROLLGATE_ACTION, ROLLGATE_EPOCH: the leader epoch, a fencing token).
    #[serde(default)]
    pub failover: Vec<String>,
    /// Fails it back.
    #[serde(default)]
    pub failback: Vec<String>,
    /// Time limit for the failover and failback hooks.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub hook_timeout: Duration,
    /// The servers.
    /// When upgrades may start a domain, e.g. ["Sat 01:00-05:00 UTC"] (empty: any time).
    #[serde(default)]
    pub maintenance_windows: Vec<String>,
    /// Servers listed here; more join by themselves (their agent's `[join]` table), and may
    /// be all of them: a pool may list none.
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
}

impl PoolConfig {
    /// True when the pool carries every label of `selector`.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Parses a label selector, `key=value[,key=value...]` (every one must match).
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!(
                "selector: {} is not key=value",
                rollgate_common::quote::quoted(part)
            )
        })?;
        let (k, v) = (k.trim(), v.trim());
        check_name("selector", k)?;
        check_name("selector", v)?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("selector: label {k} is given twice"));
        }
    }
    if out.is_empty() {
        return Err("selector: no key=value given".into());
    }
    Ok(out)
}

/// One server: its agent's address and its upgrade domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The server id (its agent's certificate carries rollgate://agent/<id>).
    pub id: String,
    /// The agent's gRPC address, host:port.
    pub agent: String,
    /// Its upgrade domain (default: assigned automatically).
    #[serde(default)]
    pub upgrade_domain: Option<String>,
}

fn default_lost_after() -> Duration {
    // Five agent heartbeats (500ms by default): a hung agent is lost within B11's 3 s, and
    // a live one would have to miss five in a row to look lost.
    Duration::from_millis(2_500)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_log_level() -> String {
    "info".into()
}
fn default_prefix() -> String {
    "/rollgate/default/".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_min_active() -> MinActive {
    MinActive::Majority
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(300)
}

/// A pool resolved for use: domains assigned, min_active counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// The pool's name.
    pub name: String,
    /// Upgrade domains in configured order, each with its servers (sorted).
    pub domains: Vec<(String, Vec<String>)>,
    /// The resolved minimum of active servers.
    pub min_active: usize,
    /// The paired pool.
    pub paired_pool: Option<String>,
}

impl PoolSpec {
    /// The pool as a running plan sees it: the plan's domains (fixed when it started, so a
    /// config change cannot reshuffle them mid-upgrade) and its `min_active`; servers the
    /// config has gained since are appended as one more domain, `not-in-plan`, which counts
    /// toward the active servers but is never upgraded by this plan.
    pub fn for_plan(plan: &crate::engine::Plan, cfg: Option<&PoolConfig>) -> PoolSpec {
        let mut domains: Vec<(String, Vec<String>)> = plan
            .domains
            .iter()
            .map(|d| {
                let mut servers = d.servers.clone();
                servers.sort();
                (d.name.clone(), servers)
            })
            .collect();
        let planned: HashSet<&String> = plan.servers().collect();
        let mut extra: Vec<String> = cfg
            .map(|c| {
                c.servers
                    .iter()
                    .map(|s| &s.id)
                    .filter(|id| !planned.contains(id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let total = planned.len() + extra.len();
        if !extra.is_empty() {
            extra.sort();
            domains.push(("not-in-plan".to_string(), extra));
        }
        let min_active = match (plan.min_active, cfg) {
            (Some(m), _) => m as usize,
            (None, Some(c)) => c.min_active.resolve(total),
            (None, None) => MinActive::Majority.resolve(total),
        };
        PoolSpec {
            name: plan.pool.clone(),
            domains,
            min_active,
            paired_pool: plan.paired_pool.clone(),
        }
    }

    /// Every server id.
    pub fn servers(&self) -> impl Iterator<Item = &String> {
        self.domains.iter().flat_map(|(_, s)| s.iter())
    }

    /// The domain of a server.
    pub fn domain_of(&self, server: &str) -> Option<&str> {
        self.domains
            .iter()
            .find(|(_, s)| s.iter().any(|x| x == server))
            .map(|(d, _)| d.as_str())
    }
}

impl PoolConfig {
    /// Assigns domains and resolves min_active.
    pub fn spec(&self) -> PoolSpec {
        let mut explicit: Vec<String> = Vec::new();
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut unassigned: Vec<&str> = Vec::new();
        for s in &self.servers {
            match &s.upgrade_domain {
                Some(d) => {
                    if !explicit.contains(d) {
                        explicit.push(d.clone());
                    }
                    by_domain.entry(d.clone()).or_default().push(s.id.clone());
                }
                None => unassigned.push(&s.id),
            }
        }
        unassigned.sort_unstable();
        let n = self.upgrade_domains.unwrap_or(1).max(1) as usize;
        let mut auto: Vec<String> = Vec::new();
        for (i, id) in unassigned.iter().enumerate() {
            let d = format!("ud-{}", i % n + 1);
            if !auto.contains(&d) && !explicit.contains(&d) {
                auto.push(d.clone());
            }
            by_domain.entry(d).or_default().push((*id).to_owned());
        }
        let mut order = explicit;
        auto.sort_by_key(|d| {
            d.trim_start_matches("ud-")
                .parse::<u32>()
                .unwrap_or(u32::MAX)
        });
        order.extend(auto);
        let domains = order
            .into_iter()
            .map(|d| {
                let mut servers = by_domain.remove(&d).unwrap_or_default();
                servers.sort();
                (d, servers)
            })
            .collect();
        PoolSpec {
            name: self.name.clone(),
            domains,
            min_active: self.min_active.resolve(self.servers.len()),
            paired_pool: self.paired_pool.clone(),
        }
    }
}

impl CoordinatorConfig {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let cfg: CoordinatorConfig = load_toml(path)?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// The address clients should use.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Checks every field; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        check_name("id", &self.id)?;
        match (&self.tls, self.insecure) {
            (None, false) => return Err("tls: missing [tls] section (ca, cert, key); set insecure = true only for a local demo".into()),
            (Some(_), true) => return Err("insecure = true and [tls] are both set: choose one".into()),
            (Some(tls), false) => tls.check_role(&Role::new(RoleKind::Coordinator, &self.id))?,
            (None, true) => {}
        }
        match &self.store {
            StoreConfig::Embedded { path } => {
                if path.as_os_str().is_empty() {
                    return Err("store.path: empty".into());
                }
            }
            StoreConfig::Etcd {
                endpoints,
                prefix,
                election_ttl,
                tls,
                auth,
                insecure,
            } => {
                if endpoints.is_empty() {
                    return Err("store.endpoints: at least one etcd endpoint is needed".into());
                }
                let plaintext = endpoints
                    .iter()
                    .filter(|e| e.starts_with("http://"))
                    .count();
                for e in endpoints {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(format!("store.endpoints: {e:?} is not an http(s) URL"));
                    }
                }
                if plaintext != 0 && plaintext != endpoints.len() {
                    return Err(
                        "store.endpoints: mixes http:// and https://; use https:// for all".into(),
                    );
                }
                match (plaintext == 0, tls, insecure) {
                    (false, _, false) => return Err(format!(
                        "store.endpoints: {:?} is plaintext: whoever reaches etcd could steer the fleet; use https:// with [store.tls], or set store.insecure = true for a local test",
                        endpoints[0]
                    )),
                    (false, Some(_), true) => return Err("store.tls is set but the endpoints are http://: use https://".into()),
                    (true, None, _) => return Err("store.tls: https:// endpoints need [store.tls] with the CA of etcd's certificates".into()),
                    (true, Some(_), true) => return Err("store.insecure = true and [store.tls] are both set: choose one".into()),
                    (true, Some(t), false) => t.check()?,
                    (false, None, true) => {}
                }
                if let Some(a) = auth {
                    if a.user.is_empty() {
                        return Err("store.auth.user: empty".into());
                    }
                    a.password()?;
                }
                if !prefix.starts_with('/') || !prefix.ends_with('/') {
                    return Err(format!(
                        "store.prefix: {prefix:?} must start and end with '/'"
                    ));
                }
                if *election_ttl < Duration::from_secs(2) || election_ttl.subsec_nanos() != 0 {
                    return Err("store.election_ttl: must be whole seconds, at least 2s (etcd's minimum lease)".into());
                }
            }
        }
        if self.lost_after < Duration::from_millis(200) {
            return Err("lost_after: must be at least 200ms".into());
        }
        let mut pools = HashSet::new();
        let mut servers = HashSet::new();
        for p in &self.pools {
            check_name("pools.name", &p.name)?;
            if !pools.insert(p.name.as_str()) {
                return Err(format!("pools: pool {:?} is defined twice", p.name));
            }
            p.windows()?;
            for s in &p.servers {
                check_name("pools.servers.id", &s.id)?;
                if !servers.insert(s.id.as_str()) {
                    return Err(format!(
                        "pools.{}.servers: server {:?} appears twice",
                        p.name, s.id
                    ));
                }
                if s.agent.parse::<SocketAddr>().is_err() && !s.agent.contains(':') {
                    return Err(format!(
                        "pools.{}.servers.{}.agent: {:?} is not host:port",
                        p.name, s.id, s.agent
                    ));
                }
                if let Some(d) = &s.upgrade_domain {
                    check_name("pools.servers.upgrade_domain", d)?;
                }
            }
            let n = p.servers.len();
            let min = p.min_active.resolve(n);
            // A pool whose servers join by themselves is checked against them when it runs.
            if n > 0 && min > n {
                return Err(format!(
                    "pools.{}.min_active: {min} is more than the pool's {n} servers",
                    p.name
                ));
            }
            if let Some(0) = p.upgrade_domains {
                return Err(format!(
                    "pools.{}.upgrade_domains: must be at least 1",
                    p.name
                ));
            }
            for (k, v) in &p.labels {
                check_name("pools.labels", k)?;
                check_name("pools.labels", v)?;
            }
            if let Some(paired) = &p.paired_pool {
                check_name("pools.paired_pool", paired)?;
                if p.failover.is_empty() {
                    return Err(format!(
                        "pools.{}.failover: a paired pool needs a failover command",
                        p.name
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(servers: &[(&str, Option<&str>)], domains: Option<u32>) -> PoolConfig {
        PoolConfig {
            name: "p".into(),
            min_active: MinActive::Majority,
            upgrade_domains: domains,
            paired_pool: None,
            labels: Default::default(),
            failover: vec![],
            failback: vec![],
            hook_timeout: Duration::from_secs(1),
            maintenance_windows: vec![],
            servers: servers
                .iter()
                .map(|(id, d)| ServerConfig {
                    id: (*id).into(),
                    agent: "127.0.0.1:1".into(),
                    upgrade_domain: d.map(String::from),
                })
                .collect(),
        }
    }

    #[test]
    fn domains_are_assigned_deterministically_and_evenly() {
        let p = pool(
            &[
                ("fe-6", None),
                ("fe-1", None),
                ("fe-3", None),
                ("fe-2", None),
                ("fe-5", None),
                ("fe-4", None),
            ],
            Some(3),
        );
        let spec = p.spec();
        assert_eq!(
            spec.domains,
            vec![
                ("ud-1".into(), vec!["fe-1".into(), "fe-4".into()]),
                ("ud-2".into(), vec!["fe-2".into(), "fe-5".into()]),
                ("ud-3".into(), vec!["fe-3".into(), "fe-6".into()]),
            ]
        );
        assert_eq!(spec.min_active, 4);
        assert_eq!(p.spec(), spec, "same input, same assignment");
    }

    #[test]
    fn explicit_domains_keep_their_order() {
        let p = pool(
            &[
                ("a", Some("west")),
                ("b", Some("east")),
                ("c", Some("west")),
            ],
            None,
        );
        let spec = p.spec();
        assert_eq!(
            spec.domains[0],
            ("west".into(), vec!["a".into(), "c".into()])
        );
        assert_eq!(spec.domains[1], ("east".into(), vec!["b".into()]));
    }

    #[test]
    fn a_running_plan_keeps_its_domains_when_the_config_gains_a_server() {
        let before = pool(
            &[
                ("fe-1", None),
                ("fe-2", None),
                ("fe-3", None),
                ("fe-4", None),
            ],
            Some(2),
        );
        let spec = before.spec();
        let plan = crate::engine::Plan {
            id: "p".into(),
            pool: "p".into(),
            version: "2".into(),
            artifact: "a".into(),
            sha256: "ab".repeat(32),
            drain: crate::engine::DrainMode::Immediate,
            parallelism: 1,
            verify_stable: Duration::ZERO,
            verify_timeout: Duration::from_secs(1),
            busy_retry_interval: Duration::from_secs(1),
            busy_retries: 1,
            on_exhausted: Default::default(),
            server_retries: 0,
            on_failure: Default::default(),
            domains: spec
                .domains
                .iter()
                .map(|(n, s)| crate::engine::Domain {
                    name: n.clone(),
                    servers: s.clone(),
                })
                .collect(),
            canary_soak: None,
            paired_pool: None,
            min_active: Some(3),
            rollback_artifact: None,
            windows: vec![],
        };
        // A server added mid-upgrade reshuffles the auto-assigned domains of the config...
        let after = pool(
            &[
                ("fe-0", None),
                ("fe-1", None),
                ("fe-2", None),
                ("fe-3", None),
                ("fe-4", None),
            ],
            Some(2),
        );
        assert_ne!(after.spec().domains, spec.domains);
        // ...but not the running plan's: the newcomer is counted, never upgraded by it.
        let running = PoolSpec::for_plan(&plan, Some(&after));
        assert_eq!(running.domains[..2], spec.domains[..]);
        assert_eq!(
            running.domains[2],
            ("not-in-plan".to_string(), vec!["fe-0".to_string()])
        );
        assert_eq!(running.min_active, 3, "fixed when the plan started");
    }

    #[test]
    fn min_active_forms() {
        assert_eq!(MinActive::Majority.resolve(6), 4);
        assert_eq!(MinActive::Majority.resolve(5), 3);
        assert_eq!(MinActive::Percent(50).resolve(5), 3);
        assert_eq!(MinActive::Count(2).resolve(9), 2);
    }

    #[test]
    fn selectors_match_every_label_given() {
        let sel = parse_selector(" tier=web , region=eu").unwrap_or_default();
        assert_eq!(sel.len(), 2);
        let mut p = pool(&[("fe-1", None)], None);
        assert!(!p.matches(&sel));
        p.labels.insert("tier".into(), "web".into());
        assert!(!p.matches(&sel), "one label of two");
        p.labels.insert("region".into(), "eu".into());
        assert!(p.matches(&sel));
        for (bad, why) in [
            ("", "no key=value"),
            ("tier", "is not key=value"),
            ("tier=web,tier=api", "given twice"),
            ("tier=we b", "must be 1-128 characters"),
        ] {
            let e = parse_selector(bad).err().unwrap_or_default();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
