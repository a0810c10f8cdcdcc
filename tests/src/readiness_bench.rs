//! `rollgate-bench readiness` (B5): a pool's readiness while a fleet's reports stream in.
//!
//! A fleet of `servers` in `pools` pools (of `domains` domains each) reports from another
//! thread at `rate` reports a second, with a burst of one report from every server every
//! `burst_every` (a fleet reconnecting, or every agent changing at once). The main thread
//! asks one pool's readiness once a millisecond and times each call. Three paths:
//!
//! - `before`: the code path before the health model: the whole health map behind one lock,
//!   cloned, then [`readiness::evaluate`] over the copy;
//! - `gate`: [`Inventory`]'s answer from its counters (what the upgrade's gate asks);
//! - `rows`: [`Inventory`]'s answer with per-server rows (what operators see), read in place.

use rollgate_coordinator::config::PoolSpec;
use rollgate_coordinator::inventory::{agent_state, Inventory};
use rollgate_coordinator::link::AgentLink;
use rollgate_coordinator::readiness::{self, Clocks, ServerHealth};
use rollgate_proto::agent::v1 as pb;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Which code path answers readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Before,
    Gate,
    Rows,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Before => "before (clone map + evaluate)",
            Path::Gate => "after, gate (counters)",
            Path::Rows => "after, rows (entries in place)",
        }
    }
}

/// The fleet's shape and load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub servers: usize,
    pub pools: usize,
    pub domains: usize,
    /// Reports a second, spread evenly.
    pub rate: u64,
    /// Every this long, one report from every server at once.
    pub burst_every: Duration,
    /// Readiness calls timed.
    pub samples: usize,
}

/// One run's latencies.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    /// Reports applied while the calls were timed.
    pub reports: u64,
}

fn server(i: usize) -> String {
    format!("fe-{i:05}")
}

/// The pools: servers dealt round-robin into pools, then into domains.
pub fn specs(load: &Load) -> Vec<PoolSpec> {
    let mut specs: Vec<PoolSpec> = (0..load.pools)
        .map(|p| PoolSpec {
            name: format!("pool-{p:03}"),
            domains: (0..load.domains)
                .map(|d| (format!("ud-{d}"), Vec::new()))
                .collect(),
            min_active: 0,
            paired_pool: None,
        })
        .collect();
    for i in 0..load.servers {
        let p = i % load.pools;
        let d = (i / load.pools) % load.domains;
        specs[p].domains[d].1.push(server(i));
    }
    for s in &mut specs {
        for (_, servers) in &mut s.domains {
            servers.sort();
        }
        // One domain may go down and leave the pool Ready.
        let total: usize = s.domains.iter().map(|(_, v)| v.len()).sum();
        s.min_active = total - total.div_ceil(load.domains);
    }
    specs
}

fn report(id: &str) -> pb::HealthReport {
    pb::HealthReport {
        server_id: id.to_owned(),
        pool: "p".into(),
        upgrade_domain: "d".into(),
        installed_version: "1.2.3".into(),
        state: pb::ServiceState::Serving as i32,
        accepting_connections: true,
        busy: false,
        active_connections: 12,
        boot_id: "6f1c2b9e-boot".into(),
        last_operation: None,
        healthy: true,
        epoch: 3,
        observed_at_ms: 0,
        detail: String::new(),
        limits: Some(pb::AgentLimits::default()),
        installed_sha256: "ab".repeat(32),
        previous_version: "1.2.2".into(),
    }
}

/// The map the code before the health model kept, written the way it wrote it.
#[derive(Debug, Default)]
struct OldMap {
    start: Option<Instant>,
    map: RwLock<HashMap<String, ServerHealth>>,
}

impl OldMap {
    fn now_ms(&self) -> u64 {
        self.start.map_or(0, |s| {
            u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)
        })
    }

    fn update(&self, server: &str, r: &pb::HealthReport) {
        let now = self.now_ms();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let serving_since_ms = map
            .get(server)
            .and_then(|h| h.serving_since_ms)
            .or(Some(now));
        map.insert(
            server.to_owned(),
            ServerHealth {
                state: agent_state(r.state),
                accepting: r.accepting_connections,
                busy: r.busy,
                healthy: r.healthy,
                version: r.installed_version.clone(),
                active_connections: r.active_connections,
                detail: r.detail.clone(),
                seen_ms: now,
                serving_since_ms,
                disconnected: false,
                limits: None,
                installed_sha256: r.installed_sha256.clone(),
            },
        );
    }
}

#[allow(clippy::large_enum_variant)] // one per benchmark run
enum Target {
    Old(OldMap),
    New(Inventory),
}

impl Target {
    fn update(&self, server: &str, r: &pb::HealthReport) {
        match self {
            Target::Old(m) => m.update(server, r),
            Target::New(inv) => inv.update(server, r),
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One run: a fresh fleet, every server heard from once, then `load.samples` timed calls
/// while reports stream in.
pub fn run(path: Path, load: &Load) -> anyhow::Result<Run> {
    let specs = specs(load);
    let target = Arc::new(match path {
        Path::Before => Target::Old(OldMap {
            start: Some(Instant::now()),
            map: RwLock::default(),
        }),
        Path::Gate | Path::Rows => Target::New(Inventory::new(&[], None)?),
    });
    let ids: Vec<String> = (0..load.servers).map(server).collect();
    let reports: Vec<pb::HealthReport> = ids.iter().map(|s| report(s)).collect();
    for (id, r) in ids.iter().zip(&reports) {
        target.update(id, r);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let writer = {
        let (target, stop, applied, load) = (
            Arc::clone(&target),
            Arc::clone(&stop),
            Arc::clone(&applied),
            *load,
        );
        std::thread::spawn(move || {
            let tick = Duration::from_millis(10);
            let per_tick = usize::try_from(load.rate / 100)
                .unwrap_or(usize::MAX)
                .max(1);
            let mut next = 0usize;
            let mut last_burst = Instant::now();
            // Bounded by the reader's stop flag, and by a minute whatever happens.
            let give_up = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                let t = Instant::now();
                let burst = last_burst.elapsed() >= load.burst_every;
                let n = if burst { ids.len() } else { per_tick };
                if burst {
                    last_burst = Instant::now();
                }
                for _ in 0..n {
                    let i = next % ids.len();
                    target.update(&ids[i], &reports[i]);
                    next += 1;
                }
                applied.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(rest) = tick.checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        })
    };
    let spec = &specs[0];
    let down = BTreeSet::new();
    let mut took = Vec::with_capacity(load.samples);
    let first = applied.load(Ordering::Relaxed);
    let mut wrong = None;
    for _ in 0..load.samples {
        let t = Instant::now();
        let r = match &*target {
            Target::Old(m) => {
                let clocks = Clocks {
                    now_ms: m.now_ms(),
                    lost_after_ms: 2_500,
                    stabilization_ms: 0,
                };
                let copy = m.map.read().unwrap_or_else(|p| p.into_inner()).clone();
                readiness::evaluate(spec, &copy, clocks, &down, false)
            }
            Target::New(inv) => {
                let clocks = Clocks {
                    now_ms: inv.now_ms(),
                    lost_after_ms: 2_500,
                    stabilization_ms: 0,
                };
                inv.readiness(spec, clocks, &down, false, path == Path::Rows)
            }
        };
        took.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        if r.state != rollgate_coordinator::engine::PoolState::Ready {
            wrong = Some(r.reason);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let reports = applied.load(Ordering::Relaxed) - first;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the report writer panicked"))?;
    if let Some(why) = wrong {
        anyhow::bail!("a healthy pool was not ready ({}): {why}", path.name());
    }
    took.sort_unstable();
    Ok(Run {
        p50_ns: percentile(&took, 0.50),
        p99_ns: percentile(&took, 0.99),
        max_ns: took.last().copied().unwrap_or(0),
        reports,
    })
}
