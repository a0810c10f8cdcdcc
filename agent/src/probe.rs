//! Facts about the local service, measured rather than assumed: a real TCP connect, the
//! established connections the kernel lists for its ports (sock_diag, else /proc/net/tcp),
//! the HTTP health URL, the busy probe.

use std::collections::{HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// TCP states from include/net/tcp_states.h that still hold a client: ESTABLISHED (01),
/// SYN_RECV (03) and CLOSE_WAIT (08, the client hung up but the service has not closed yet).
const ACTIVE_STATES: [&str; 3] = ["01", "03", "08"];

/// Counts connections in `/proc/net/tcp`-format text whose local port is one of `ports` and
/// whose state still holds a client. Listening sockets and closing ones are not counted, nor
/// connections from `own` (this agent's own accept probes: a service that keeps its listener
/// open while it drains leaves them in its accept queue, in CLOSE_WAIT, and they are no client).
pub fn count_active(proc_net_tcp: &str, ports: &HashSet<u16>, own: &HashSet<SocketAddr>) -> u32 {
    let mut n = 0u32;
    for line in proc_net_tcp.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_slot), Some(local), Some(remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(port) = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !ports.contains(&port) || !ACTIVE_STATES.contains(&state) {
            continue;
        }
        if !own.is_empty() && proc_addr(remote).is_some_and(|a| own.contains(&a)) {
            continue;
        }
        n = n.saturating_add(1);
    }
    n
}

/// An address as `/proc/net/tcp` and `tcp6` print it: the IP as 32-bit words in the kernel's
/// byte order, in hex, then `:` and the port in hex.
fn proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    if ip.len() != 8 && ip.len() != 32 {
        return None;
    }
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => IpAddr::from(v4),
        Err(_) => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
    };
    Some(SocketAddr::new(ip, port))
}

/// How long a probe's connection may stay in the service's accept queue and still be known as
/// the agent's own; past it the kernel may give its port to another connection.
const OWN_PROBE_MEMORY: Duration = Duration::from_secs(60);

/// At most this many recent probes are remembered (a probe runs every report interval at most).
const OWN_PROBES_KEPT: usize = 1024;

/// The local ends of this agent's recent accept probes, newest last.
static OWN_PROBES: Mutex<VecDeque<(SocketAddr, Instant)>> = Mutex::new(VecDeque::new());

fn remember_probe(local: SocketAddr) {
    let mut own = OWN_PROBES.lock().unwrap_or_else(|p| p.into_inner());
    if own.len() >= OWN_PROBES_KEPT {
        own.pop_front();
    }
    own.push_back((local, Instant::now()));
}

/// The local ends of the probes made in the last [`OWN_PROBE_MEMORY`].
fn own_probes() -> HashSet<SocketAddr> {
    let mut own = OWN_PROBES.lock().unwrap_or_else(|p| p.into_inner());
    while own
        .front()
        .is_some_and(|(_, at)| at.elapsed() > OWN_PROBE_MEMORY)
    {
        own.pop_front();
    }
    own.iter().map(|(a, _)| *a).collect()
}

/// Established connections on `ports`, over IPv4 and IPv6, in this network namespace, the
/// agent's own probes left out. Asked of the kernel through sock_diag ([`crate::sock_diag`]);
/// where that is refused (a kernel or sandbox without it), read from `/proc/net/tcp` and
/// `tcp6`, which costs milliseconds per look on a server with a large TCP hash table.
pub async fn active_connections(ports: &HashSet<u16>) -> u32 {
    let asked = {
        let ports = ports.clone();
        tokio::task::spawn_blocking(move || crate::sock_diag::count(&ports, &own_probes())).await
    };
    match asked {
        Ok(Ok(n)) => return n,
        Ok(Err(e)) => warn_sock_diag_once(&e.to_string()),
        Err(e) => warn_sock_diag_once(&e.to_string()),
    }
    let own = own_probes();
    let mut total = 0u32;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = tokio::fs::read_to_string(file).await {
            total = total.saturating_add(count_active(&text, ports, &own));
        }
    }
    total
}

fn warn_sock_diag_once(error: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(%error, "cannot count connections through sock_diag; reading /proc/net/tcp instead");
    });
}

/// True when a TCP connect to every port succeeds within `timeout`.
pub async fn accepting(host: &str, ports: &[u16], timeout: Duration) -> bool {
    for &port in ports {
        match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(stream)) => {
                if let Ok(local) = stream.local_addr() {
                    remember_probe(local);
                }
            }
            _ => return false,
        }
    }
    true
}

/// The kernel's boot id, or empty when it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The HTTP health probe: `Ok(())` for a 2xx answer, else why not. It asks the service to close
/// the connection after answering: a connection kept alive for the next probe would be counted
/// among the service's clients, and hold up a drain whose service does not close idle ones.
pub async fn http_health(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), String> {
    let probe = client
        .get(url)
        .header(reqwest::header::CONNECTION, "close")
        .timeout(timeout);
    match probe.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("health probe {url} answered {}", r.status())),
        Err(e) => Err(format!("health probe {url} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:D2F0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:1F90 0100007F:D2F2 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0
   4: 0100007F:1F90 0100007F:D2F4 08 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1
";

    #[test]
    fn counts_only_server_side_connections_that_hold_a_client() {
        let ports: HashSet<u16> = [8080].into_iter().collect();
        // Line 0 listens, line 2 is the client's side, line 3 is TIME_WAIT: not counted.
        assert_eq!(count_active(SAMPLE, &ports, &HashSet::new()), 2);
        let other: HashSet<u16> = [9090].into_iter().collect();
        assert_eq!(count_active(SAMPLE, &other, &HashSet::new()), 0);
    }

    #[test]
    fn the_agents_own_probes_are_not_counted() {
        let ports: HashSet<u16> = [8080].into_iter().collect();
        // Line 4 is a client at 127.0.0.1:54004 (0xD2F4) in CLOSE_WAIT: the agent's own probe.
        let own: HashSet<SocketAddr> = ["127.0.0.1:54004".parse().expect("an address")].into();
        assert_eq!(count_active(SAMPLE, &ports, &own), 1);
        // The same port from another address is another client.
        let elsewhere: HashSet<SocketAddr> = ["10.0.0.1:54004".parse().expect("an address")].into();
        assert_eq!(count_active(SAMPLE, &ports, &elsewhere), 2);
        assert_eq!(
            proc_addr("00000000000000000000000001000000:C350"),
            Some("[::1]:50000".parse().expect("an address"))
        );
        assert_eq!(proc_addr("0100007F"), None);
        assert_eq!(proc_addr("7F:1F90"), None);
    }

    /// A listener that never accepts (a draining service that keeps its socket open): the
    /// agent's probe sits in its accept queue and the kernel lists it, but it is no client.
    #[tokio::test]
    async fn a_probe_left_in_the_accept_queue_is_not_an_open_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let ports: HashSet<u16> = [port].into_iter().collect();
        assert!(accepting("127.0.0.1", &[port], Duration::from_secs(2)).await);
        // The kernel lists the queued probe (in CLOSE_WAIT once the probe side closed)...
        let text = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
        assert_eq!(count_active(&text, &ports, &HashSet::new()), 1, "{text}");
        // ... and the agent does not count it.
        assert_eq!(active_connections(&ports).await, 0);
        // A client of someone else is counted.
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        assert_eq!(active_connections(&ports).await, 1);
        drop(listener);
    }

    #[test]
    fn ipv6_addresses_parse() {
        let text = "header\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 0:0 0:0 0 0 0 1\n";
        let ports: HashSet<u16> = [8080].into_iter().collect();
        assert_eq!(count_active(text, &ports, &HashSet::new()), 1);
    }

    #[test]
    fn garbage_lines_count_nothing() {
        let ports: HashSet<u16> = [8080].into_iter().collect();
        assert_eq!(
            count_active("header\nnonsense\n  1: zz:zz\n", &ports, &HashSet::new()),
            0
        );
    }

    /// An HTTP/1.1 server that keeps every connection open unless asked to close it, as a
    /// service that does not close idle connections while it drains.
    async fn keep_alive_server(listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut held = Vec::new();
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    held.extend_from_slice(&buf[..n]);
                    if !held.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    let close = String::from_utf8_lossy(&held)
                        .to_ascii_lowercase()
                        .contains("connection: close");
                    held.clear();
                    let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn the_health_probes_own_connection_is_not_left_open_as_a_client() -> std::io::Result<()>
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn(keep_alive_server(listener));
        let ports: HashSet<u16> = [port].into_iter().collect();
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/health");
        for _ in 0..3 {
            assert_eq!(
                http_health(&client, &url, Duration::from_secs(5)).await,
                Ok(())
            );
        }
        // The server closes each probe's connection once it has answered.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut left = active_connections(&ports).await;
        while left > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            left = active_connections(&ports).await;
        }
        assert_eq!(
            left, 0,
            "the probe's connection is still open at the service"
        );
        server.abort();
        Ok(())
    }

    #[tokio::test]
    async fn counts_a_real_connection() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let ports: HashSet<u16> = [port].into_iter().collect();
        assert_eq!(active_connections(&ports).await, 0);
        let _client = TcpStream::connect(("127.0.0.1", port)).await?;
        let (_server_side, _) = listener.accept().await?;
        assert_eq!(active_connections(&ports).await, 1);
        assert!(accepting("127.0.0.1", &[port], Duration::from_secs(1)).await);
        drop(listener);
        assert!(!accepting("127.0.0.1", &[port], Duration::from_secs(1)).await);
        Ok(())
    }
}
