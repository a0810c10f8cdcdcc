//! The coordinator's Prometheus metrics (`rollgate_*`), served at `/metrics` when the config
//! has an `[http]` table. Counters and histograms are recorded where things happen (the
//! driver, the store writes, the take-over); the gauges describing the fleet are set from the
//! node's live state at each scrape, so they are never stale.

use crate::control::Control;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::LazyLock;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

fn step_buckets() -> Histogram {
    // 10 ms .. ~3 h.
    Histogram::new(exponential_buckets(0.01, 3.0, 14))
}

/// Every metric a coordinator exports.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Registry,
    leader: Gauge,
    epoch: Gauge,
    agents_connected: Family<Labels, Gauge>,
    agents_lost: Family<Labels, Gauge>,
    agent_channels: Family<Labels, Gauge>,
    pool_readiness: Family<Labels, Gauge>,
    upgrade_status: Family<Labels, Gauge>,
    servers_done: Family<Labels, Gauge>,
    upgrade_held: Family<Labels, Gauge>,
    rollout_status: Family<Labels, Gauge>,
    rollout_pools: Family<Labels, Gauge>,
    step_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    store_write_seconds: Histogram,
    store_write_errors: Family<Labels, Counter>,
    fences: Family<Labels, Counter>,
}

const ROLLOUT_STATUSES: [&str; 5] = ["running", "paused", "completed", "failed", "aborted"];
const ROLLOUT_STAGES: [&str; 6] = [
    "pending",
    "starting",
    "running",
    "completed",
    "failed",
    "skipped",
];

const READINESS: [&str; 3] = ["Ready", "Busy", "InsufficientActiveFrontEnds"];
const STATUSES: [&str; 8] = [
    "none",
    "running",
    "paused",
    "completed",
    "aborted",
    "failed",
    "rolling_back",
    "rolled_back",
];

impl CoordinatorMetrics {
    fn new() -> CoordinatorMetrics {
        let mut r = Registry::with_prefix("rollgate");
        let leader = Gauge::default();
        r.register(
            "coordinator_leader",
            "1 when this coordinator leads, else 0",
            leader.clone(),
        );
        let epoch = Gauge::default();
        r.register(
            "coordinator_epoch",
            "The epoch of the current leader (0 when none is known)",
            epoch.clone(),
        );
        let agents_connected = Family::<Labels, Gauge>::default();
        r.register(
            "agents_connected",
            "Agents reporting health, per pool",
            agents_connected.clone(),
        );
        let agents_lost = Family::<Labels, Gauge>::default();
        r.register(
            "agents_lost",
            "Agents not heard from within lost_after (or unreachable), per pool",
            agents_lost.clone(),
        );
        let agent_channels = Family::<Labels, Gauge>::default();
        r.register(
            "agent_channels",
            "Agents by how this coordinator reaches them: over the report line (line) or over gRPC (grpc: an agent without the line, or no TLS)",
            agent_channels.clone(),
        );
        let pool_readiness = Family::<Labels, Gauge>::default();
        r.register(
            "pool_readiness",
            "1 for the pool's readiness state (Ready, Busy, InsufficientActiveFrontEnds), 0 for the others",
            pool_readiness.clone(),
        );
        let upgrade_status = Family::<Labels, Gauge>::default();
        r.register(
            "upgrade_status",
            "1 for the status of the pool's latest upgrade, 0 for the others",
            upgrade_status.clone(),
        );
        let servers_done = Family::<Labels, Gauge>::default();
        r.register(
            "upgrade_servers_done",
            "Servers the pool's latest upgrade has finished",
            servers_done.clone(),
        );
        let upgrade_held = Family::<Labels, Gauge>::default();
        r.register(
            "upgrade_held",
            "1 while the store refuses the pool's upgrade writes (etcd out of space, a request too large) and the upgrade holds",
            upgrade_held.clone(),
        );
        let rollout_status = Family::<Labels, Gauge>::default();
        r.register(
            "rollout_status",
            "1 for the status of the newest roll-out, 0 for the others (all 0 when none was started)",
            rollout_status.clone(),
        );
        let rollout_pools = Family::<Labels, Gauge>::default();
        r.register(
            "rollout_pools",
            "Pools of the newest roll-out, by stage",
            rollout_pools.clone(),
        );
        let step_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(step_buckets);
        r.register_with_unit(
            "step_duration",
            "How long upgrade steps took, from the call to the agent's final answer, by step and result",
            Unit::Seconds,
            step_seconds.clone(),
        );
        let store_write_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register_with_unit(
            "store_write_duration",
            "How long one fenced store write took",
            Unit::Seconds,
            store_write_seconds.clone(),
        );
        let store_write_errors = Family::<Labels, Counter>::default();
        r.register(
            "store_write_errors",
            "Failed fenced store writes, by kind (unavailable, fenced, denied, other)",
            store_write_errors.clone(),
        );
        let fences = Family::<Labels, Counter>::default();
        r.register(
            "fences_sent",
            "Fence calls sent to agents on taking over, by result (ok, failed)",
            fences.clone(),
        );
        CoordinatorMetrics {
            registry: r,
            leader,
            epoch,
            agents_connected,
            agents_lost,
            agent_channels,
            pool_readiness,
            upgrade_status,
            servers_done,
            upgrade_held,
            rollout_status,
            rollout_pools,
            step_seconds,
            store_write_seconds,
            store_write_errors,
            fences,
        }
    }

    /// A step ended (`result`: succeeded, failed, unknown).
    pub fn step(&self, step: &str, result: &str, took: Duration) {
        self.step_seconds
            .get_or_create(&vec![
                ("step", step.to_owned()),
                ("result", result.to_owned()),
            ])
            .observe(took.as_secs_f64());
    }

    /// A fenced write took `took`; `error` names its failure kind.
    pub fn store_write(&self, took: Duration, error: Option<&str>) {
        self.store_write_seconds.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.store_write_errors
                .get_or_create(&vec![("kind", kind.to_owned())])
                .inc();
        }
    }

    /// A fence call was answered.
    pub fn fence(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.fences
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// Sets the fleet gauges from `control`'s live state, then encodes everything.
    pub async fn scrape(&self, control: &Control) -> hyper_response::Response {
        let node = control.node();
        let lead = node.leadership();
        self.leader.set(i64::from(lead.is_some()));
        let epoch = match &lead {
            Some(l) => Some(l.epoch.get()),
            None => control
                .leader()
                .await
                .ok()
                .and_then(|v| v.leader.map(|l| l.epoch.get())),
        };
        self.epoch
            .set(epoch.map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX)));
        let channels = node.env.agents.channels();
        for (kind, n) in [("line", channels.line), ("grpc", channels.grpc)] {
            self.agent_channels
                .get_or_create(&vec![("kind", kind.to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for pool in &node.cfg.pools {
            let p = vec![("pool", pool.name.clone())];
            if let Ok((r, _)) = control.readiness(&pool.name).await {
                let servers = r.domains.iter().flat_map(|d| &d.servers);
                let lost = servers
                    .clone()
                    .filter(|s| s.state == crate::readiness::ServerState::Lost)
                    .count();
                let total = servers.count();
                self.agents_connected
                    .get_or_create(&p)
                    .set(i64::try_from(total - lost).unwrap_or(0));
                self.agents_lost
                    .get_or_create(&p)
                    .set(i64::try_from(lost).unwrap_or(0));
                let state = crate::api::readiness_of(&r, false).state;
                let name = rollgate_proto::operator::names::readiness_state(state);
                for s in READINESS {
                    let mut l = p.clone();
                    l.push(("state", s.to_owned()));
                    self.pool_readiness
                        .get_or_create(&l)
                        .set(i64::from(s == name));
                }
            }
            if let Ok(u) = control.upgrade(&pool.name).await {
                let s = crate::api::status_of(u.as_ref(), &pool.name, false, 0, String::new());
                let name = rollgate_proto::operator::names::upgrade_state(s.status);
                for st in STATUSES {
                    let mut l = p.clone();
                    l.push(("status", st.to_owned()));
                    self.upgrade_status
                        .get_or_create(&l)
                        .set(i64::from(st == name));
                }
                let done = s
                    .servers
                    .iter()
                    .filter(|x| x.phase == rollgate_proto::operator::v1::ServerPhase::Done as i32)
                    .count();
                self.servers_done
                    .get_or_create(&p)
                    .set(i64::try_from(done).unwrap_or(0));
            }
            let held = lead.is_some()
                && node
                    .driver(&pool.name)
                    .is_some_and(|h| crate::driver::lock_held(&h.held).is_some());
            self.upgrade_held.get_or_create(&p).set(i64::from(held));
        }
        if let Ok(r) = control.rollout(None).await {
            let name = r.as_ref().map_or("", |r| r.status.name());
            for st in ROLLOUT_STATUSES {
                self.rollout_status
                    .get_or_create(&vec![("status", st.to_owned())])
                    .set(i64::from(st == name));
            }
            for stage in ROLLOUT_STAGES {
                let n = r.as_ref().map_or(0, |r| {
                    r.pools.values().filter(|p| p.stage.name() == stage).count()
                });
                self.rollout_pools
                    .get_or_create(&vec![("stage", stage.to_owned())])
                    .set(i64::try_from(n).unwrap_or(0));
            }
        }
        rollgate_common::http::metrics_response(&self.registry)
    }
}

mod hyper_response {
    pub type Response =
        rollgate_common::http::hyper_reexport::Response<rollgate_common::http::Body>;
}

/// The coordinator's metrics.
pub static METRICS: LazyLock<CoordinatorMetrics> = LazyLock::new(CoordinatorMetrics::new);
