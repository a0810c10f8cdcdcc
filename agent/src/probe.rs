//! Facts about the local service, measured rather than assumed: a real TCP connect, the
//! established connections the kernel lists for its ports, the HTTP health URL, the busy probe.

use std::collections::HashSet;
use std::time::Duration;
use tokio::net::TcpStream;

/// TCP states from include/net/tcp_states.h that still hold a client: ESTABLISHED (01),
/// SYN_RECV (03) and CLOSE_WAIT (08, the client hung up but the service has not closed yet).
const ACTIVE_STATES: [&str; 3] = ["01", "03", "08"];

/// Counts connections in `/proc/net/tcp`-format text whose local port is one of `ports` and
/// whose state still holds a client. Listening sockets and closing ones are not counted.
pub fn count_active(proc_net_tcp: &str, ports: &HashSet<u16>) -> u32 {
    let mut n = 0u32;
    for line in proc_net_tcp.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_slot), Some(local), Some(_remote), Some(state)) =
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
        if ports.contains(&port) && ACTIVE_STATES.contains(&state) {
            n = n.saturating_add(1);
        }
    }
    n
}

/// Established connections on `ports`, over IPv4 and IPv6, in this network namespace.
pub async fn active_connections(ports: &HashSet<u16>) -> u32 {
    let mut total = 0u32;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = tokio::fs::read_to_string(file).await {
            total = total.saturating_add(count_active(&text, ports));
        }
    }
    total
}

/// True when a TCP connect to every port succeeds within `timeout`.
pub async fn accepting(host: &str, ports: &[u16], timeout: Duration) -> bool {
    for &port in ports {
        let ok = matches!(
            tokio::time::timeout(timeout, TcpStream::connect((host, port))).await,
            Ok(Ok(_))
        );
        if !ok {
            return false;
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

/// The HTTP health probe: `Ok(())` for a 2xx answer, else why not.
pub async fn http_health(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), String> {
    match client.get(url).timeout(timeout).send().await {
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
        assert_eq!(count_active(SAMPLE, &ports), 2);
        let other: HashSet<u16> = [9090].into_iter().collect();
        assert_eq!(count_active(SAMPLE, &other), 0);
    }

    #[test]
    fn ipv6_addresses_parse() {
        let text = "header\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 0:0 0:0 0 0 0 1\n";
        let ports: HashSet<u16> = [8080].into_iter().collect();
        assert_eq!(count_active(text, &ports), 1);
    }

    #[test]
    fn garbage_lines_count_nothing() {
        let ports: HashSet<u16> = [8080].into_iter().collect();
        assert_eq!(count_active("header\nnonsense\n  1: zz:zz\n", &ports), 0);
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
