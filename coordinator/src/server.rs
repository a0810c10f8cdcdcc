//! Wiring of the coordinator daemon: store, inventory, the node's leadership loop, the operator
//! API and grpc.health.v1, and the one shutdown path (cancel → resign → stop serving → drain).

use crate::api::{MembershipApi, OperatorApi};
use crate::config::{CoordinatorConfig, EtcdAuth, EtcdTls, StoreConfig};
use crate::control::Control;
use crate::env::{CommandHooks, Env, SystemClock};
use crate::inventory::Inventory;
use crate::node::Node;
use crate::store::{EmbeddedStore, EtcdAccess, EtcdStore, Store};
use rollgate_proto::operator::v1::membership_server::MembershipServer;
use rollgate_proto::operator::v1::operator_server::OperatorServer;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Where `[http]` listens when it names no address.
const DEFAULT_HTTP: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9180);

/// Opens the configured store.
pub async fn open_store(cfg: &CoordinatorConfig) -> anyhow::Result<Store> {
    Ok(match &cfg.store {
        StoreConfig::Embedded { path } => Store::Embedded(EmbeddedStore::open(path)?),
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
            auth,
            ..
        } => {
            let access = etcd_access(tls.as_ref(), auth.as_ref())?;
            Store::Etcd(EtcdStore::connect_with(endpoints, prefix, access).await?)
        }
    })
}

/// Reads the etcd TLS files and password named in the config.
pub fn etcd_access(tls: Option<&EtcdTls>, auth: Option<&EtcdAuth>) -> anyhow::Result<EtcdAccess> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("store.tls.{what} {}: {e}", p.display()))
    };
    let tls = match tls {
        None => None,
        Some(t) => {
            let mut o = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read("ca", &t.ca)?));
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                o = o.identity(etcd_client::Identity::from_pem(
                    read("cert", cert)?,
                    read("key", key)?,
                ));
            }
            if let Some(name) = &t.server_name {
                o = o.domain_name(name.clone());
            }
            Some(o)
        }
    };
    let user = match auth {
        None => None,
        Some(a) => Some((a.user.clone(), a.password().map_err(anyhow::Error::msg)?)),
    };
    Ok(EtcdAccess { tls, user })
}

/// Runs the coordinator until `shutdown` is cancelled. The bound address is written to
/// `addr_file` when given (useful with port 0).
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: CancellationToken,
    addr_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let mut cfg = cfg;
    if cfg.advertise.is_none() {
        cfg.advertise = Some(addr.to_string());
    }
    let store = open_store(&cfg).await?;
    let agents: Vec<(String, String)> = cfg
        .pools
        .iter()
        .flat_map(|p| p.servers.iter().map(|s| (s.id.clone(), s.agent.clone())))
        .collect();
    let client_tls = match &cfg.tls {
        Some(t) => Some(crate::agent_tls::AgentTls::from_files(t)?),
        None => None,
    };
    let inventory = Arc::new(Inventory::new(&agents, client_tls)?);
    let env = Env {
        me: cfg.id.clone(),
        store,
        agents: Arc::clone(&inventory) as Arc<dyn crate::link::AgentLink>,
        hooks: Arc::new(CommandHooks),
        clock: Arc::new(SystemClock),
        lost_after: cfg.lost_after,
        stabilization: cfg.stabilization,
    };
    let grace = cfg.shutdown_grace;
    let max_msg = 1 << 20;
    let tls = match &cfg.tls {
        Some(t) => Some(t.server_config()?),
        None => None,
    };
    let insecure = cfg.insecure;
    let http = match &cfg.http {
        Some(h) => Some(rollgate_common::http::bind(h.listen_or(DEFAULT_HTTP)).await?),
        None => None,
    };
    let lost_after = cfg.lost_after;
    let node = Node::new(Arc::new(cfg), env);
    let watchers = CancellationToken::new();
    inventory.watch_all(
        &node.tasks,
        &watchers,
        crate::inventory::line_idle(lost_after),
    );
    let (expiry, stop_expiry) = (Arc::clone(&inventory), watchers.clone());
    node.tasks
        .spawn(async move { expiry.expire_loop(lost_after, &stop_expiry).await });
    node.tasks
        .spawn(Arc::clone(&node).membership_loop(shutdown.clone()));
    node.tasks
        .spawn(Arc::clone(&node).lead_loop(shutdown.clone()));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<OperatorServer<OperatorApi>>().await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    } else {
        tracing::warn!(
            "INSECURE MODE: no TLS and no role checks on {addr}; use only for a local demo"
        );
    }
    if let Some(listener) = http {
        let http_addr = listener.local_addr()?;
        let control = Control::new(Arc::clone(&node));
        let views = crate::web::Views::start(control.clone(), &node.tasks, shutdown.clone());
        let handler = crate::web::handler(control, views, shutdown.clone());
        node.tasks.spawn(rollgate_common::http::serve(
            listener,
            handler,
            shutdown.clone(),
            node.tasks.clone(),
        ));
        if let Some(f) = &addr_file {
            // Next to the gRPC address file, for tests and scripts that bind port 0.
            std::fs::write(f.with_extension("http"), http_addr.to_string())?;
        }
        tracing::info!(addr = %http_addr, "web view at / and metrics at /metrics");
    }
    if let Some(f) = addr_file {
        std::fs::write(f, addr.to_string())?;
    }
    tracing::info!(%addr, id = %node.cfg.id, "coordinator listening");
    let stop = shutdown.clone();
    let served = builder
        .add_service(health)
        .add_service(
            OperatorServer::new(OperatorApi::new(Control::new(Arc::clone(&node)), insecure))
                .max_decoding_message_size(max_msg),
        )
        .add_service(
            MembershipServer::new(MembershipApi::new(Control::new(Arc::clone(&node))))
                .max_decoding_message_size(64 * 1024),
        )
        .serve_with_incoming_shutdown(rollgate_common::incoming_nodelay(listener), async move {
            stop.cancelled().await
        })
        .await;
    reporter
        .set_not_serving::<OperatorServer<OperatorApi>>()
        .await;
    watchers.cancel();
    node.tasks.close();
    if tokio::time::timeout(grace, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks still running at the shutdown deadline");
    }
    served?;
    Ok(())
}
