//! Wiring: bind, TLS, the Agent and grpc.health.v1 services, the health reporter, and the one
//! shutdown path (token cancelled → stop accepting → drain operations with a deadline).

use crate::config::AgentConfig;
use crate::core::AgentCore;
use crate::grpc::AgentApi;
use rollgate_proto::agent::v1::agent_server::AgentServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Where `[http]` listens when it names no address.
const DEFAULT_HTTP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9181);

/// Runs the agent until `shutdown` is cancelled, then drains. The bound address is written to
/// `<state_dir>/agent.addr` once listening (useful with port 0).
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let insecure = cfg.insecure;
    // TLS is done here rather than by tonic, so that a connection can choose the report line
    // (ALPN) instead of HTTP/2.
    let tls = match &cfg.tls {
        Some(files) => Some(rollgate_common::peer_tls::server_config(
            files,
            &[b"h2", rollgate_proto::line::ALPN],
        )?),
        None => None,
    };
    let grace = cfg.shutdown_grace;
    let max_msg = cfg.max_message_bytes;
    let http = match &cfg.http {
        Some(h) => Some(rollgate_common::http::bind(h.listen_or(DEFAULT_HTTP)).await?),
        None => None,
    };
    let cfg_for_join = cfg.clone();
    let core = AgentCore::open(cfg, shutdown.clone()).await?;
    core.tasks().spawn(Arc::clone(&core).report_loop());
    core.tasks()
        .spawn(crate::join::run(cfg_for_join, addr, shutdown.clone()));
    if let Some(listener) = http {
        let http_addr = listener.local_addr()?;
        // For tests and scripts that bind port 0.
        core.write_named_addr("http.addr", http_addr)?;
        tracing::info!(addr = %http_addr, "metrics at /metrics");
        let handler: rollgate_common::http::Handler = Arc::new(|req| {
            Box::pin(async move {
                use rollgate_common::http::hyper_reexport::{Method, StatusCode};
                use rollgate_common::http::{metrics_response, text};
                match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => {
                        metrics_response(crate::metrics::METRICS.registry())
                    }
                    (&Method::GET, _) => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
                    _ => text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET only\n"),
                }
            })
        });
        let tasks = core.tasks().clone();
        core.tasks().spawn(rollgate_common::http::serve(
            listener,
            handler,
            shutdown.clone(),
            tasks,
        ));
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_serving::<AgentServer<AgentApi>>().await;
    // "" speaks for the front end (what a load balancer asks); the agent's own service name
    // for the agent.
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    core.tasks()
        .spawn(Arc::clone(&core).front_end_health(reporter.clone()));
    let api = AgentServer::new(AgentApi::new(Arc::clone(&core), insecure))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg.max(64 * 1024));

    let builder = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api);
    if tls.is_none() {
        tracing::warn!("INSECURE MODE: no TLS and no role checks; anyone who can reach {addr} can drain, stop and install. Use only for a local demo.");
    }
    core.write_addr_file(addr)?;
    tracing::info!(%addr, server_id = %core.cfg.server_id, pool = %core.cfg.pool, epoch = core.epoch().get(), "agent listening");

    let stop = shutdown.clone();
    let incoming = rollgate_common::incoming_nodelay(listener);
    let accepting = Arc::clone(&core);
    let serve = async move {
        match tls {
            Some(tls) => {
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                let tasks = accepting.tasks().clone();
                tasks.spawn(accept_tls(accepting, incoming, tls, tx));
                let tls_incoming = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
                });
                builder
                    .serve_with_incoming_shutdown(tls_incoming, stop.cancelled_owned())
                    .await
            }
            None => {
                builder
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await
            }
        }
    };
    let served = serve.await;
    reporter.set_not_serving::<AgentServer<AgentApi>>().await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    if core.drain_tasks(grace).await {
        tracing::info!("agent stopped cleanly");
    } else {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "operations still running at the shutdown deadline; the journal marks them interrupted"
        );
    }
    served?;
    Ok(())
}

/// How long a client may take over its TLS handshake before its connection is dropped.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Accepts connections until shutdown: each one's TLS handshake runs on its own task; HTTP/2
/// connections go to the gRPC server (`to_grpc`), report lines are served here.
async fn accept_tls(
    core: Arc<AgentCore>,
    incoming: impl tokio_stream::Stream<Item = std::io::Result<TcpStream>>,
    tls: Arc<rustls::ServerConfig>,
    to_grpc: tokio::sync::mpsc::Sender<TlsStream<TcpStream>>,
) {
    use tokio_stream::StreamExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stop = core.shutdown_token().clone();
    tokio::pin!(incoming);
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            next = incoming.next() => match next {
                Some(Ok(tcp)) => tcp,
                Some(Err(e)) => {
                    // Out of descriptors or similar: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
                None => return,
            },
        };
        let (acceptor, to_grpc, core2) = (acceptor.clone(), to_grpc.clone(), Arc::clone(&core));
        core.tasks().spawn(async move {
            let peer = tcp.peer_addr().ok();
            let stream = match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(?peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(?peer, "tls handshake timed out");
                    return;
                }
            };
            if stream.get_ref().1.alpn_protocol() == Some(rollgate_proto::line::ALPN) {
                crate::line::serve(core2, stream).await;
            } else {
                let _ = to_grpc.send(stream).await;
            }
        });
    }
}
