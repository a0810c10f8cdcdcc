//! The live inventory: one health stream per agent, kept in memory (no store write per report),
//! and the gRPC clients the driver uses to command agents.

use crate::readiness::ServerHealth;
use rollgate_proto::agent::v1 as pb;
use rollgate_proto::agent::v1::agent_client::AgentClient;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Health of every known server, and a clock to stamp it with.
#[derive(Debug)]
pub struct Inventory {
    start: Instant,
    health: RwLock<HashMap<String, ServerHealth>>,
    clients: HashMap<String, AgentClient<Channel>>,
}

/// Why an agent client could not be made.
#[derive(Debug, thiserror::Error)]
#[error("agent {server} at {address}: {message}")]
pub struct LinkError {
    /// The server.
    pub server: String,
    /// Its configured address.
    pub address: String,
    /// What is wrong.
    pub message: String,
}

/// Maps a wire service state to its lower-case name.
pub fn state_name(s: i32) -> String {
    pb::ServiceState::try_from(s)
        .ok()
        .filter(|s| *s != pb::ServiceState::Unspecified)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SERVICE_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Inventory {
    /// Makes a lazily-connecting client for every `(server, address)`.
    pub fn new(
        agents: &[(String, String)],
        tls: Option<ClientTlsConfig>,
    ) -> Result<Inventory, LinkError> {
        let mut clients = HashMap::new();
        for (server, address) in agents {
            let err = |message: String| LinkError {
                server: server.clone(),
                address: address.clone(),
                message,
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{address}"))
                .map_err(|e| err(e.to_string()))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            if let Some(t) = &tls {
                ep = ep.tls_config(t.clone()).map_err(|e| err(e.to_string()))?;
            }
            clients.insert(
                server.clone(),
                AgentClient::new(ep.connect_lazy()).max_decoding_message_size(1 << 20),
            );
        }
        Ok(Inventory {
            start: Instant::now(),
            health: RwLock::new(HashMap::new()),
            clients,
        })
    }

    /// Milliseconds since this inventory was made (the readiness clock).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A client for `server`.
    pub fn client(&self, server: &str) -> Option<AgentClient<Channel>> {
        self.clients.get(server).cloned()
    }

    /// Every server with a client.
    pub fn servers(&self) -> impl Iterator<Item = &String> {
        self.clients.keys()
    }

    /// A copy of all health.
    pub fn snapshot(&self) -> HashMap<String, ServerHealth> {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies a report from `server`'s agent.
    pub fn update(&self, server: &str, r: &pb::HealthReport) {
        let now = self.now_ms();
        let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
        let prev = map.get(server);
        let mut state = state_name(r.state);
        let mut detail = r.detail.clone();
        if r.server_id != server {
            // A miswired address: never count someone else's health as this server's.
            state = "failed".into();
            detail = format!(
                "the agent at this address reports server_id {:?}",
                r.server_id
            );
        }
        let serving = state == "serving";
        let serving_since_ms = match prev {
            Some(p) if p.state == "serving" && !p.disconnected && serving => p.serving_since_ms,
            _ if serving => Some(now),
            _ => None,
        };
        map.insert(
            server.to_owned(),
            ServerHealth {
                state,
                accepting: r.accepting_connections,
                busy: r.busy,
                healthy: r.healthy,
                version: r.installed_version.clone(),
                active_connections: r.active_connections,
                detail,
                seen_ms: now,
                serving_since_ms,
                disconnected: false,
            },
        );
    }

    /// Marks `server`'s stream broken: it stops counting as active at once.
    pub fn disconnected(&self, server: &str, why: &str) {
        let mut map = self.health.write().unwrap_or_else(|p| p.into_inner());
        let seen = map.get(server).map_or(0, |h| h.seen_ms);
        let entry = map
            .entry(server.to_owned())
            .or_insert_with(|| ServerHealth {
                state: "unknown".into(),
                accepting: false,
                busy: false,
                healthy: false,
                version: String::new(),
                active_connections: 0,
                detail: String::new(),
                seen_ms: seen,
                serving_since_ms: None,
                disconnected: true,
            });
        entry.disconnected = true;
        entry.serving_since_ms = None;
        entry.detail = why.to_owned();
    }

    /// Asks `server`'s agent for a fresh probe now and applies it (used before readiness
    /// decisions, so a server that just finished verify is not judged on a stale report).
    pub async fn refresh(&self, server: &str) {
        let Some(mut c) = self.client(server) else {
            return;
        };
        let asked_ms = self.now_ms();
        let mut req = tonic::Request::new(pb::HealthRequest {});
        req.set_timeout(Duration::from_secs(3));
        match c.health(req).await {
            Ok(r) => self.update(server, &r.into_inner()),
            Err(e) => {
                // The health stream may have delivered a report while this call hung: that
                // report is fresher than this failure.
                let fresh = self
                    .snapshot()
                    .get(server)
                    .is_some_and(|h| !h.disconnected && h.seen_ms >= asked_ms);
                if !fresh {
                    self.disconnected(server, &format!("health call failed: {}", e.message()));
                }
            }
        }
    }

    /// [`Inventory::refresh`] for several servers at once.
    pub async fn refresh_all(self: &Arc<Self>, servers: impl IntoIterator<Item = String>) {
        let mut set = tokio::task::JoinSet::new();
        for s in servers {
            let me = Arc::clone(self);
            set.spawn(async move { me.refresh(&s).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Starts one watch task per agent on `tasks`, until `stop` is cancelled.
    pub fn watch_all(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        for server in self.clients.keys() {
            let (me, server, stop) = (Arc::clone(self), server.clone(), stop.clone());
            tasks.spawn(async move { me.watch_one(&server, &stop).await });
        }
    }

    async fn watch_one(&self, server: &str, stop: &CancellationToken) {
        let Some(mut client) = self.client(server) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut connected = false;
            let attempt = async {
                let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
                while let Some(r) = stream.message().await? {
                    connected = true;
                    self.update(server, &r);
                }
                Ok::<(), tonic::Status>(())
            };
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                r = attempt => match r {
                    Ok(()) => "health stream ended".to_owned(),
                    Err(e) => format!("health stream failed: {}", e.message()),
                },
            };
            tracing::debug!(%server, %why, "agent health stream lost; reconnecting");
            if connected {
                // It worked for a while: start the backoff afresh.
                backoff = Duration::from_millis(100);
            }
            self.disconnected(server, &why);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
