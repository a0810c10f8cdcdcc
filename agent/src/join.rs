//! Joining the pool by itself: at start, the agent asks its coordinators to add it to its pool
//! (`rollgate.operator.v1.Membership/Join`), so a server joins by starting its agent. The
//! certificate names the server; the pool and upgrade domain come from this agent's config.
//!
//! Any coordinator may be asked: a follower answers with the leader's address, which is asked
//! next. Until one accepts, the agent keeps trying (it serves its own API meanwhile: a
//! coordinator that lists it in its config reaches it anyway). A refusal (unknown pool, a bad
//! address) is logged as an error and tried again slowly, since it is fixed on the
//! coordinators' side.
//!
//! Whoever answers must prove a coordinator's certificate (`rollgate://coordinator/...`), not
//! only one of the deployment's CA that names the address dialled: another agent or an
//! operator's certificate at a coordinator's address is refused before the request is sent
//! (see [`rollgate_common::peer_tls`]).

use crate::config::AgentConfig;
use rollgate_common::peer_tls::{Expected, PeerTls, Refusal};
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::v1 as pb;
use rollgate_proto::operator::v1::membership_client::MembershipClient;
use rollgate_proto::operator::LEADER_HEADER;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

/// The first pause between rounds; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// One coordinator's whole answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The call to make: join with this request, or leave.
#[derive(Clone)]
enum Call {
    Join(pb::JoinRequest),
    Leave,
}

/// How one call ended.
enum Answer {
    Joined(String),
    /// Ask this address next.
    Leader(String),
    /// Not now (no leader yet, unreachable): try the next one.
    Later(String),
    /// Refused for a reason only the coordinators' side can fix.
    Refused(String),
}

/// Joins until it worked or `stop` fires.
pub async fn run(cfg: AgentConfig, listen: SocketAddr, stop: CancellationToken) {
    let Some(join) = cfg.join.clone() else {
        return;
    };
    let tls = match cfg.tls.as_ref().map(PeerTls::from_files) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot join: the TLS files are unusable");
            return;
        }
        None => {
            tracing::error!("cannot join without [tls]");
            return;
        }
    };
    let request = pb::JoinRequest {
        pool: cfg.pool.clone(),
        upgrade_domain: cfg.upgrade_domain.clone(),
        address: join.address(listen),
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut queue: Vec<String> = join.coordinators.clone();
        let mut asked = 0;
        while let Some(addr) = queue.first().cloned() {
            queue.remove(0);
            asked += 1;
            // A leader hint is followed at most a few times per round.
            if asked > join.coordinators.len() + 3 {
                break;
            }
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                a = ask(&addr, &tls, Call::Join(request.clone())) => a,
            };
            match answer {
                Answer::Joined(message) => {
                    tracing::info!(coordinator = %addr, pool = %request.pool, address = %request.address, "{message}");
                    return;
                }
                Answer::Leader(leader) => queue.insert(0, leader),
                Answer::Later(why) => {
                    tracing::debug!(coordinator = %addr, %why, "join: trying the next coordinator");
                }
                Answer::Refused(why) => {
                    tracing::error!(coordinator = %addr, pool = %request.pool, %why, "join refused; trying again later");
                    backoff = MAX_BACKOFF;
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Leaves every pool this server joined (`rollgate-agent leave`): the coordinators in
/// `cfg`'s `[join]` table are asked in turn, a follower's answer leads to the leader, for at
/// most `within`. Returns the leader's answer, or why it could not be had.
pub async fn leave(cfg: &AgentConfig, within: Duration) -> Result<String, String> {
    let join = cfg
        .join
        .as_ref()
        .ok_or("leave: the config has no [join] table naming the coordinators")?;
    let tls = match cfg.tls.as_ref().map(PeerTls::from_files) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(format!("leave: the TLS files are unusable: {e}")),
        None => return Err("leave: the config has no [tls] (leaving needs mTLS)".into()),
    };
    let deadline = tokio::time::Instant::now() + within;
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::from("no coordinator answered");
    loop {
        let mut queue: Vec<String> = join.coordinators.clone();
        let mut asked = 0;
        while let Some(addr) = queue.first().cloned() {
            queue.remove(0);
            asked += 1;
            if asked > join.coordinators.len() + 3 {
                break;
            }
            match ask(&addr, &tls, Call::Leave).await {
                Answer::Joined(message) => return Ok(message),
                Answer::Leader(leader) => queue.insert(0, leader),
                Answer::Later(why) => last = format!("{addr}: {why}"),
                Answer::Refused(why) => return Err(format!("{addr} refused: {why}")),
            }
        }
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(format!(
                "no coordinator could answer within {within:?}: {last}"
            ));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn ask(addr: &str, tls: &PeerTls, call: Call) -> Answer {
    // The scheme only labels requests: the connector does the handshake and the role check.
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(3))
            .timeout(CALL_TIMEOUT),
        Err(e) => return Answer::Refused(format!("coordinator address {addr}: {e}")),
    };
    let refusal = Refusal::default();
    let connector = tls.connector(
        Expected::Kind(RoleKind::Coordinator),
        std::sync::Arc::clone(&refusal),
    );
    let channel = match endpoint.connect_with_connector(connector).await {
        Ok(c) => c,
        Err(e) => {
            let refused = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
            return match refused {
                Some(why) => Answer::Refused(why),
                None => Answer::Later(format!("cannot connect: {e}")),
            };
        }
    };
    let mut client = MembershipClient::new(channel);
    let answer = match call {
        Call::Join(request) => client.join(request).await,
        Call::Leave => client.leave(pb::LeaveRequest {}).await,
    };
    match answer {
        Ok(r) => Answer::Joined(r.into_inner().message),
        Err(s) => {
            let leader = s
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match (s.code(), leader) {
                (tonic::Code::FailedPrecondition, Some(l)) => Answer::Leader(l),
                (tonic::Code::Unavailable | tonic::Code::DeadlineExceeded, _) => {
                    Answer::Later(s.message().to_owned())
                }
                _ => Answer::Refused(format!("{:?}: {}", s.code(), s.message())),
            }
        }
    }
}
