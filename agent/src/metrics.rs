//! The agent's Prometheus metrics (`rollgate_agent_*`), served at `/metrics` when the config
//! has an `[http]` table. Process-wide, like the process it describes.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::LazyLock;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

fn op_buckets() -> Histogram {
    // 10 ms .. ~3 h: a verify of a few ms up to a long drain.
    Histogram::new(exponential_buckets(0.01, 3.0, 14))
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    operations: Family<Labels, Counter>,
    operation_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    hook_failures: Family<Labels, Counter>,
    probe_seconds: Histogram,
    service_state: Family<Labels, Gauge>,
}

/// The service states, for the state-set gauge.
pub const STATES: [&str; 8] = [
    "serving",
    "draining",
    "drained",
    "stopped",
    "installing",
    "starting",
    "failed",
    "unknown",
];

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("rollgate_agent");
        let operations = Family::<Labels, Counter>::default();
        registry.register(
            "operations",
            "Operations run, by kind and result (succeeded, failed)",
            operations.clone(),
        );
        let operation_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(op_buckets);
        registry.register_with_unit(
            "operation_duration",
            "How long operations took, by kind",
            Unit::Seconds,
            operation_seconds.clone(),
        );
        let hook_failures = Family::<Labels, Counter>::default();
        registry.register(
            "hook_failures",
            "Service hook commands that failed or timed out, by hook",
            hook_failures.clone(),
        );
        let probe_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register_with_unit(
            "probe_duration",
            "How long one health probe of the service took",
            Unit::Seconds,
            probe_seconds.clone(),
        );
        let service_state = Family::<Labels, Gauge>::default();
        registry.register(
            "service_state",
            "1 for the service's current state, 0 for the others",
            service_state.clone(),
        );
        AgentMetrics {
            registry,
            operations,
            operation_seconds,
            hook_failures,
            probe_seconds,
            service_state,
        }
    }

    /// The registry, to encode.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// An operation of `kind` ended.
    pub fn operation(&self, kind: &str, ok: bool, took: Duration) {
        let result = if ok { "succeeded" } else { "failed" };
        self.operations
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
        self.operation_seconds
            .get_or_create(&vec![("kind", kind.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// A hook failed.
    pub fn hook_failed(&self, hook: &str) {
        self.hook_failures
            .get_or_create(&vec![("hook", hook.to_owned())])
            .inc();
    }

    /// A probe took `took`, and found the service in `state` (one of [`STATES`]).
    pub fn probed(&self, took: Duration, state: &str) {
        self.probe_seconds.observe(took.as_secs_f64());
        for s in STATES {
            self.service_state
                .get_or_create(&vec![("state", s.to_owned())])
                .set(i64::from(s == state));
        }
    }
}

/// The agent's metrics.
pub static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);
