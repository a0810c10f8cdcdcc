//! A coordinator node: campaigns for leadership, and while it leads, fences the agents, resumes
//! every unfinished upgrade from the store and runs one driver per pool. Leadership is a value
//! others watch (`leader`); losing it stops every driver at once.

use crate::config::CoordinatorConfig;
use crate::driver::{upgrade_key, Command, Driver, Env, Stored};
use crate::engine::{Action, Upgrade};
use crate::store::{Candidate, Leadership, StoreError};
use rollgate_proto::agent::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running driver, as the operator API sees it.
#[derive(Debug, Clone)]
pub struct DriverHandle {
    /// Sends operator commands.
    pub commands: mpsc::Sender<Command>,
    /// The engine state after every transition.
    pub status: watch::Receiver<Option<Upgrade>>,
}

/// One coordinator.
#[derive(Debug)]
pub struct Node {
    /// Its configuration.
    pub cfg: Arc<CoordinatorConfig>,
    /// Store, inventory, clocks.
    pub env: Env,
    /// Current leadership, if this node leads.
    pub leader: watch::Sender<Option<Leadership>>,
    drivers: Mutex<HashMap<String, DriverHandle>>,
    /// Serialises upgrade starts, so two concurrent requests cannot both pass the "nothing is
    /// running on this pool" check.
    pub start_lock: tokio::sync::Mutex<()>,
    /// Every task this node spawned.
    pub tasks: TaskTracker,
}

impl Node {
    /// A node that does not lead yet.
    pub fn new(cfg: Arc<CoordinatorConfig>, env: Env) -> Arc<Node> {
        let (leader, _) = watch::channel(None);
        Arc::new(Node {
            cfg,
            env,
            leader,
            drivers: Mutex::new(HashMap::new()),
            start_lock: tokio::sync::Mutex::new(()),
            tasks: TaskTracker::new(),
        })
    }

    /// The leadership this node holds now, if any and not lost.
    pub fn leadership(&self) -> Option<Leadership> {
        self.leader
            .borrow()
            .clone()
            .filter(|l| !l.lost.is_cancelled())
    }

    /// The driver of `pool`, if one runs here.
    pub fn driver(&self, pool: &str) -> Option<DriverHandle> {
        self.drivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pool)
            .cloned()
    }

    /// Campaigns, leads until leadership is lost, and campaigns again, until `shutdown`.
    /// On shutdown a leader resigns so that a follower takes over at once.
    pub async fn lead_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let me = Candidate {
            id: self.cfg.id.clone(),
            address: self.cfg.advertise(),
        };
        let ttl = match &self.cfg.store {
            crate::config::StoreConfig::Etcd { election_ttl, .. } => *election_ttl,
            crate::config::StoreConfig::Embedded { .. } => Duration::from_secs(5),
        };
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let lead = match self.env.store.campaign(&me, ttl, &shutdown).await {
                Ok(l) => l,
                Err(StoreError::Cancelled) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(epoch = lead.epoch.get(), id = %self.cfg.id, "became leader");
            Arc::clone(&self).lead(lead.clone()).await;
            tokio::select! {
                _ = lead.lost.cancelled() => {
                    tracing::warn!(epoch = lead.epoch.get(), "leadership lost: all leader work stopped");
                }
                _ = shutdown.cancelled() => {
                    tracing::info!(epoch = lead.epoch.get(), "resigning leadership");
                    if let Err(e) = self.env.store.resign(&lead).await {
                        tracing::warn!(error = %e, "resign failed; followers take over when the lease expires");
                    }
                    lead.lost.cancel();
                }
            }
            self.leader.send_replace(None);
            self.drivers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    /// Takes over: fences agents, then resumes unfinished upgrades from the store.
    async fn lead(self: Arc<Self>, lead: Leadership) {
        self.fence_agents(&lead).await;
        self.leader.send_replace(Some(lead.clone()));
        for pool in &self.cfg.pools {
            let stored = match self.env.store.get(&upgrade_key(&pool.name)).await {
                Ok(Some(kv)) => match serde_json::from_slice::<Stored>(&kv.value) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(pool = %pool.name, error = %e, "stored upgrade is unreadable; not resuming it");
                        continue;
                    }
                },
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(pool = %pool.name, error = %e, "cannot read the stored upgrade; not resuming it");
                    continue;
                }
            };
            if stored.upgrade.is_terminal() && stored.upgrade.in_flight() == 0 {
                continue;
            }
            let actions = stored.upgrade.resume();
            tracing::info!(pool = %pool.name, plan = %stored.upgrade.plan.id, actions = actions.len(), "resuming upgrade");
            self.start_driver(&lead, pool.clone(), stored, actions, true);
        }
    }

    /// Raises the epoch on every agent so that an older leader's calls are refused from now on.
    /// Unreachable agents are fenced by the epoch on the first command they get.
    async fn fence_agents(&self, lead: &Leadership) {
        let mut set = tokio::task::JoinSet::new();
        for server in self.env.inventory.servers() {
            let Some(mut c) = self.env.inventory.client(server) else {
                continue;
            };
            let (server, epoch) = (server.clone(), lead.epoch.get());
            set.spawn(async move {
                let mut req = tonic::Request::new(pb::FenceRequest { epoch });
                req.set_timeout(Duration::from_secs(2));
                (server, c.fence(req).await)
            });
        }
        while let Some(Ok((server, r))) = set.join_next().await {
            match r {
                Ok(_) => {}
                Err(s) if s.message().starts_with("stale epoch") => {
                    tracing::warn!(%server, "agent has seen a newer epoch: this leadership is stale");
                    lead.lost.cancel();
                }
                Err(s) => {
                    tracing::warn!(%server, error = %s.message(), "could not fence agent (it will be fenced by its next command)")
                }
            }
        }
    }

    /// Starts a driver for `stored` on this node's tasks.
    pub fn start_driver(
        self: &Arc<Self>,
        lead: &Leadership,
        pool: crate::config::PoolConfig,
        stored: Stored,
        actions: Vec<Action>,
        resuming: bool,
    ) {
        let (status_tx, status_rx) = watch::channel(None);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let name = pool.name.clone();
        let driver = Driver::new(self.env.clone(), lead.clone(), pool, stored, status_tx);
        self.drivers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.clone(),
                DriverHandle {
                    commands: cmd_tx,
                    status: status_rx,
                },
            );
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            match driver.run(actions, resuming, cmd_rx).await {
                Ok(u) => tracing::info!(pool = %name, status = ?u.status, "driver done"),
                Err(e) => tracing::warn!(pool = %name, error = %e, "driver stopped"),
            }
            // Keep the handle: its status receiver still shows the final state to readers.
            let _ = &me;
        });
    }
}
